"""Speed: predicted decode and prefill tokens per second of a configuration, from the bytes it puts on each device.

Decode is memory-bound: every weight a token uses is read once, plus the KV cache up to the current depth, and
each token costs a fixed time on top (kernel launches, synchronisation). Per device i (reference/speed.md):

    seconds per token = Σ_i bytes_read_i / (η · bandwidth_i) + t0

with η and t0 per backend, fitted (weighted least squares on the relative error) on the published llama-bench rows
of data/speed.json, never guessed, and on rows of today's llama.cpp: CUDA's rows of May 2024 (ERA_2024) ran the
kernels of then (an RTX 4090 prefilled Llama-3-8B at 0.56 of today's rate; decode's fitted fixed cost per token was
three times today's), so they fit constants of their own, which predict only them. A card with HBM (a data-centre
A100, H100, H200) reads at its own η: in May 2024's builds llama.cpp's batch-1 kernels read about half of an HBM
card's specified bandwidth where GDDR cards read 0.9 (fitted on the A100 SXM with that era's t0, held out on the
A100 and H100 PCIe); today's rows hold no HBM card's decode, so today's η for HBM keeps that ratio to today's GDDR η.
Bytes read per token: every block weight on the device (MoE routed experts x used / total), the output layer where
it lives, no token embeddings (one row is read), and the KV cache at the depth (a sliding-window layer reads at
most its window). An MoE's routed experts are read at the same share, and each routed expert matrix a token
multiplies by costs a fixed time beyond its bytes (Fit.expert_matrix_s, about 1.4 us on today's CUDA: Qwen3-30B-A3B's
1152 small matrices a token, 768 x 2048 each, cost it a third of its time where gpt-oss-20b's 288, 2880 x 2880,
decode near their bytes' pace), where a backend has a published MoE row; elsewhere nothing, unchecked.

Where a backend's published rows show its mat-vec kernel for K-quants (and i-quants) slower than memory (Apple's
M1 Max decodes Llama-3-8B Q4_K_M at 153 GB/s where its Q4_0 and F16 reach 230-280), such a weight also costs
`kquant_ops` FLOPs over the device's FLOPS, fitted on those rows, and a device's read takes the longer of the two:

    seconds on device i = max(bytes_read_i / (η · bandwidth_i), K-quant weights_i x kquant_ops / FLOPS_i)

Prefill is compute-bound: 2 x active parameters FLOPs per token over the device's FLOPS, times a slope, plus a fixed
cost per token (dequantizing, launches), per backend, fitted the same way; float weights (F16, BF16, F32) have their
own slope where a backend's era has published float rows (May 2024's CUDA multiplied them on the FP16 tensor cores
directly where it dequantized the others: Llama-3-8B F16 prefilled 1.1-1.3x as fast as its Q4_K_M; today's CUDA rows
hold no float row, so today's float weights take the quantized slope). The output layer is left out: a prompt's
logits are computed for its last token only. An MoE's prefill adds each micro-batch's pass over the routed experts it
sends tokens to (expert_pass_s): at the published micro-batches of 16-64 tokens an expert, llama.cpp's MMQ for
mul_mat_id spends about as long on each micro-batch as reading those experts at a fitted fifth of the bandwidth
(Fit.expert_pass_eff, fitted on Qwen3-30B-A3B on an RTX PRO 6000 and gpt-oss-20b on an RTX 3090, held out on an RTX
5090 and on micro-batch sweeps from 16 to 2048 tokens): at llama-bench's default micro-batch that pass is most of an
MoE's prefill (Qwen3-30B-A3B prefills at a quarter of what its FLOPs alone say).

Attention grows with depth: 2 x heads x (K + V head size) FLOPs per layer and cached position (a sliding-window layer
at most its window). A backend whose published rows measure it at depth (a CPU: llama-bench pp512 beside pp4096) has
its own attention efficiency, fitted on them, and pays it in decode and prefill; elsewhere decode at depth is bound by
reading the KV cache (counted in the bytes) and prefill's attention runs at the matmuls' efficiency (flash attention
is a matmul there). This host's CPU goes further: llama.cpp's own kernels are timed on it once
(launcher.measure.kernels), decode and prefill apart. Each layer's flash-attention rate for its shape and cache
types prices that layer, since a quantized cache's per-query loop runs at a fraction of the published (f16)
figure. Each weight type's matrix products, timed on the model's own shapes of that type, price the weights the
CPU multiplies by: a CPU's dot-product kernels, not its memory, often set the pace (the 2-core test machine decoded
SmolLM2-135M faster as F16 than as Q4_1, and prefilled Q8_0 at 190 GFLOPS where Q4_1 reached 72). The KV cache is
then read at the fitted memory rate beside them, and each block tensor on the CPU adds llama.cpp's fixed cost per
op, measured on this host by decoding the embedded model (a small model's decode is a third of it).

    bytes_per_token(option, depth)          bytes read per decoded token, per device of the estimate (pure)
    attention_flops(option, depth)          attention FLOPs of one token at a depth, per device (pure)
    times(option, device_speeds, depth, n_prompt)  predicted seconds per token by part (pure)
    predict(option, device_speeds, depth, n_prompt=, calibration=)  Speed(tg_per_s, pp_per_s) (pure)
    rates(times, calibration)               the same from parts already computed (pure)
    expert_pass_s(...)                      an MoE micro-batch's pass over the routed experts it uses (pure)
    solve_ratios(short, deep, fill)         a warm-up's measured / predicted ratios: decode, attention, prefill
    machine_speeds(machine, options)        DeviceSpeed per plan device name (GPU0.., CPU): a GPU's own figures
                                            (NVML, a profile), then the table by name; the host's bandwidth from a
                                            profile, else measured once (a short multi-threaded copy and matrix
                                            product, cached), and the options' flash-attention and weight rates on
                                            this host (host_kernels, cached)
    calibration(machine, backend, version, quant, model)  the median measured / predicted ratios of this
                                            machine's record: the model's own runs first, then its quant type's
    parse_bandwidth(text), parse_flops(text)  a profile's "936GB/s", "142TFLOPS"
    measured_speed(reply)                   decode and prefill tokens/s a server reports for one reply (pure)
    fitted(backend)                         a backend's Fit: decode eta and t0, prefill slope and fixed cost
    device_table()                          bandwidth and FLOPS by device name (data/speed.json)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.calibration import Calibration
from launcher.defaults import DEFAULT_UBATCH

if TYPE_CHECKING:
    from launcher.chat import ChatReply
    from launcher.hardware.types import HardwareSnapshot
    from launcher.measure.kernels import AttentionShape, WeightSet
    from launcher.plan import Option

GiB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class DeviceSpeed:
    """What one device offers: memory bandwidth (bytes/s), dense FP16 FLOPS (FP32 for a CPU) and its link to the
    host (PCIe, one direction, bytes/s); None: unknown."""

    bandwidth_bytes_per_s: float
    flops: float | None = None
    backend: str = "cuda"  # which fitted constants apply: cuda, rocm, metal, vulkan, cpu
    link_bytes_per_s: float | None = None
    # FLOPs per second measured on this host's llama.cpp kernels (launcher.measure.kernels): attention by rate_key,
    # a layer's shape and cache types; weights by weight_key, one type's matrices. Where a part has one, it prices
    # that part instead of the fitted figures.
    kernel_rates: Mapping[str, float] | None = field(default=None, compare=False)
    # seconds per block tensor llama.cpp spends on a decoded token beyond its products, measured on this host
    # (launcher.measure.kernels.measure_tensor_overhead); None: the fitted fixed cost alone
    tensor_overhead_s: float | None = None
    hbm: bool = False  # high-bandwidth memory (a data-centre card): read at the backend's HBM efficiency


@dataclass(frozen=True)
class Speed:
    """Predicted tokens per second: decode (tg) and prefill (pp); None where a figure is unknown."""

    tg_per_s: float | None
    pp_per_s: float | None

    def to_json(self) -> dict[str, float | None]:
        return {
            "tg_per_s": None if self.tg_per_s is None else round(self.tg_per_s, 1),
            "pp_per_s": None if self.pp_per_s is None else round(self.pp_per_s, 1),
        }


@functools.cache
def _data() -> dict[str, Any]:
    text = resources.files("launcher").joinpath("data/speed.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def device_table() -> dict[str, DeviceSpeed]:
    """Bandwidth and FLOPS of known devices by name (data/speed.json): NVIDIA, AMD and Apple by chip and GPU bin, and
    the CPUs of the published CPU rows (their FP32 peak: llama.cpp's CPU backend computes in FP32)."""
    from launcher.hardware.nvml import pcie_bytes_per_s

    out = {}
    for name, entry in _data()["devices"].items():
        backend = "metal" if name.startswith("Apple") else "rocm" if name.startswith("AMD") else "cuda"
        tflops = entry.get("fp16_tflops")
        if entry.get("cpu"):
            backend, tflops = "cpu", entry.get("fp32_tflops")
        link = None
        if entry.get("pcie"):  # "4.0 x16": the card's own link
            generation, _, lanes = entry["pcie"].partition(" x")
            link = pcie_bytes_per_s(int(float(generation)), int(lanes))
        flops = None if tflops is None else tflops * 1e12
        hbm = str(entry.get("memory", "")).startswith("HBM")
        out[name] = DeviceSpeed(entry["bandwidth_gbps"] * GB, flops, backend, link, hbm=hbm)
    return out


# what makes a longer name another chip's: a laptop's chip ("RTX 4090 Laptop GPU": 576 GB/s, not the card's 1008)
# and a mobile part are not the card of the same number either
_SIBLING = r"(?![0-9a-z]| (?:ti|super|xtx?|gre|pro|max|ultra|d|laptop|mobile)\b)"


def _names(name: str, text: str) -> bool:
    """`name` holds `text` (any case), and not as the start of a sibling chip's name: "RTX 4060" is not the RTX 4060
    Ti, "M1" not the M1 Pro, "RX 7600" not the RX 7600 XT or 7600M, "RX 6800" not the RX 6800M, the RTX 4090 not
    the "RTX 4090 Laptop GPU"."""
    return re.search(re.escape(text.lower()) + _SIBLING, name.lower()) is not None


def table_gpu(text: str) -> str:
    """The chip table's GPU that `text` names ('RTX 4090', 'M3 Max (40-core GPU)'): an exact name (any case), else
    the one chip whose name holds it. Raises ValueError naming the choices when none or several match."""
    from launcher.units import shown_value

    wanted = " ".join(text.split()).lower()
    gpus = [name for name, speed in device_table().items() if speed.backend != "cpu"]
    exact = [name for name in gpus if name.lower() == wanted]
    found = exact or [name for name in gpus if wanted and _names(name, wanted)]
    if len(found) == 1:
        return found[0]
    # the start of several names ("RTX 40", "RX 7900") is a choice to make; of one, another chip's ("RTX 4060")
    partial = found or [name for name in gpus if wanted and wanted in name.lower()]
    if len(partial) > 1:
        raise ValueError(f"GPU name {shown_value(text)} matches {len(partial)} chips ({'; '.join(partial)}); name one "
                         "of them")  # fmt: skip
    # a sibling's name goes on in words ("RTX 4060" in "RTX 4060 Ti"); one that goes on in digits is another chip's
    # ("A40" in "RTX A4000")
    held = bool(partial) and re.search(re.escape(wanted) + r"(?!\d)", partial[0].lower()) is not None
    sibling = f", only another chip's name holds it ({partial[0]})" if held else ""
    nearest = [] if held else _nearest(wanted, gpus)
    near = f"nearest: {'; '.join(nearest)}; " if nearest else ""
    raise ValueError(f"GPU name {shown_value(text)} is not in the chip table{sibling} ({near}`fitquant hw --chips` "
                     f"lists all {len(gpus)}); for another GPU, give its bandwidth and flops in a profile's "
                     "device")  # fmt: skip


def chip_table() -> list[dict[str, Any]]:
    """Every GPU of the chip table (`hw --chips`): name, backend, bandwidth, its memory where the table says
    (HBM2e: read at the backend's HBM efficiency), FLOPS and host link (None: unified memory), in the table's order."""
    entries = _data()["devices"]
    return [{"name": name, "backend": speed.backend, "bandwidth_bytes_per_s": speed.bandwidth_bytes_per_s,
             "memory": entries[name].get("memory"), "flops": speed.flops,
             "host_link_bytes_per_s": speed.link_bytes_per_s}
            for name, speed in device_table().items() if speed.backend != "cpu"]  # fmt: skip


_BIN = re.compile(r" \(\d+-core gpu\)$")
_VENDOR = re.compile(r"^(?:nvidia geforce |nvidia |amd radeon |amd |apple |tesla )")


def _nearest(wanted: str, gpus: Sequence[str], count: int = 5) -> list[str]:
    """The chip table's names most like `wanted` (a misspelt or unknown name), their vendor's words left out of the
    likeness ("rtx 3090" is no nearer one NVIDIA card than another for being NVIDIA's)."""
    import difflib

    short: dict[str, str] = {}
    for name in gpus:
        key = _VENDOR.sub("", name.lower())
        short.setdefault(key, name)
        short.setdefault(_BIN.sub("", key), name)  # "m3 max" beside "m3 max (30-core gpu)": a chip named alone
    found = difflib.get_close_matches(_VENDOR.sub("", wanted), list(short), n=2 * count, cutoff=0.6)
    return list(dict.fromkeys(short[key] for key in found))[:count]  # a name once, where both its keys came near


def _table_entry(name: str, table: Mapping[str, DeviceSpeed]) -> str | None:
    """The chip table's entry for a device's name: the name itself, an entry the name holds (a driver's longer
    name), else the one GPU entry that holds the name (a person's "RTX 4090" in a profile); None: not in the table."""
    if name in table:
        return name
    held = next((k for k in table if _names(name, k)), None)
    if held is not None:
        return held
    with contextlib.suppress(ValueError):
        return table_gpu(name)
    return None


def published_rows() -> list[dict[str, Any]]:
    """The published llama-bench rows the constants are fitted on, each with its bytes read per decoded token, the
    parameters a prompt token multiplies by (no token embeddings, no output layer: logits for the last token only),
    the weights a decoded token multiplies by (the output layer's included) and its attention FLOPs per cached
    position. A tied output layer is the token embedding read in full."""
    return [_with_counts(row) for row in _data()["rows"]]


def validation_rows() -> list[dict[str, Any]]:
    """Published llama-bench rows held out: never fitted on, predicted as the fitted ones are (a `suspect` row says
    why it is not held to the same bound)."""
    return [_with_counts(row) for row in _data().get("validation", [])]


def _with_counts(row: Mapping[str, Any]) -> dict[str, Any]:
    tied = bool(row.get("tied"))
    embd_bytes = row["embd_params"] * row["embd_bytes_per_param"]
    # a prefill-only row (no tg) may give no size: it reads nothing a decode would
    read = None if row.get("size_gib") is None else row["size_gib"] * GiB - (0 if tied else embd_bytes)
    prompt_params = row["params"] - row["embd_params"] * (1 if tied else 2)
    decode_params = row["params"] - (0 if tied else row["embd_params"])
    # an MoE row: its routed experts' tensors (`expert_bytes`, `expert_params`; `expert_tensors` of them, gate, up and
    # down per layer), `experts_used` of `experts` a token: it reads and multiplies by that share of them
    expert_matrices = 0
    if row.get("experts"):
        expert_matrices = row["expert_tensors"] * row["experts_used"]
        share = row["experts_used"] / row["experts"]
        unused = row["expert_params"] * (1 - share)
        prompt_params, decode_params = prompt_params - unused, decode_params - unused
        read = None if read is None else read - row["expert_bytes"] + row["expert_bytes"] * share
    attention = 2 * row["layers"] * row["heads"] * 2 * row["head_dim"] if row.get("heads") else 0
    return {**row, "bytes_per_token": read, "expert_matrices": expert_matrices, "active_params": prompt_params,
            "decode_params": decode_params, "attention_flops": attention, "weights": _row_weights(row)}  # fmt: skip


@dataclass(frozen=True)
class Fit:
    """A backend's fitted constants: decode reads at eta x bandwidth with a fixed t0 per token; prefill computes at
    FLOPS / pp_slope with a fixed pp_t0 per token (None: no published prefill row to fit on); attention runs at
    attention_eff x FLOPS (None: no published row at depth; see the module's docstring)."""

    eta: float
    t0_s: float
    pp_slope: float | None
    pp_t0_s: float
    attention_eff: float | None = None
    # float weights' prefill (None: as quantized ones) and a K-quant weight's FLOPs in decode (None: bound by memory)
    pp_slope_float: float | None = None
    pp_t0_float_s: float = 0.0
    kquant_ops: float | None = None
    # an HBM card's decode efficiency (None: the backend has no HBM row, and reads HBM at `eta`, unchecked)
    eta_hbm: float | None = None
    # an MoE's routed experts (None: the backend has no published MoE row, and prices them as dense weights,
    # unchecked): in decode, seconds each routed expert matrix a token multiplies by costs beyond its bytes; in
    # prefill, the share of the bandwidth a micro-batch's pass over the experts it routes to runs at (expert_pass_s)
    expert_matrix_s: float | None = None
    expert_pass_eff: float | None = None

    def eta_of(self, device: DeviceSpeed) -> float:
        """The share of `device`'s bandwidth a decoded token reads at."""
        return self.eta_hbm if device.hbm and self.eta_hbm is not None else self.eta


PP_TOKENS = 512  # llama-bench's pp512: the prompt a plan's prefill figure is for
# The prediction's form: a run's measured / predicted ratios hold for the predictions they were measured against,
# so a record of another form does not calibrate this one (raised whenever what a prediction counts changes).
# 3: a CPU's attention at the host's measured flash-attention rate (launcher.measure.kernels)
# 4: float weights' own prefill slope; a K-quant compute floor in decode where a backend's rows show one
# 5: a CPU's weights at the host's measured matrix-product rate per type (launcher.measure.kernels)
# 6: an HBM card's own decode efficiency
# 7: CUDA fitted on today's llama.cpp rows, May 2024's builds apart (ERA_2024)
# 8: an MoE's routed experts decode at their own fitted efficiency
# 9: an MoE's routed expert matrices cost a fixed time each in decode, its micro-batches a pass over them in prefill
# 10: Metal's MoE expert terms (fitted on an M1 Max row), after its K-quant floor
MODEL_VERSION = 10
FLOAT_WEIGHTS = frozenset({"F32", "F16", "BF16"})


def is_kquant(type_name: str) -> bool:
    """A K-quant or i-quant ggml type (Q2_K..Q6_K, IQ*): a super-block of sub-block scales to unpack per weight (the
    i-quants, with no published row of their own, are priced as K-quants)."""
    name = type_name.upper()
    return name.startswith("IQ") or bool(re.fullmatch(r"Q[2-8]_K", name))


def _row_weights(row: Mapping[str, Any]) -> str:
    """A published row's weights: 'float', 'kquant' or 'quant', by its model's quant label ("Llama-3-8B Q4_K_M")."""
    label = row["model"].rsplit(" ", 1)[-1].upper()
    if label in FLOAT_WEIGHTS:
        return "float"
    return "kquant" if is_kquant(re.sub(r"_(XXS|XS|S|M|L|NL)$", "", label)) else "quant"


# A published row's llama.cpp, where its kernels differ from today's (data/speed.json `era`): "2024-05", the CUDA
# builds of May 2024 (b2824-b2843), before PR #8075 (June 2024) moved quantized prompt processing from dequantizing
# to FP16 for cuBLAS to MMQ's int8 tensor-core kernels. Their figures fit their own constants, which predict only
# their own rows; a plan predicts today's llama.cpp (era None), fitted on today's rows alone.
ERA_2024 = "2024-05"


@functools.cache
def fitted(backend: str, era: str | None = None) -> Fit:
    """The constants for `backend` in `era` (None: today's llama.cpp; see ERA_2024), fitted by weighted least squares on
    the relative error over its published rows of that era: 1/tg = bytes / (eta · bandwidth) + t0 and 1/pp = slope · 2 ·
    active params / FLOPS + pp_t0. A backend with fewer than two rows of its own takes the slope of every GPU row of the
    era and fits only its fixed cost on its own rows. Decode's eta and t0 come from the rows of cards without HBM; an
    HBM card's eta from the backend's own HBM rows, t0 held (a row marked `prefill_held_out` is fitted for its decode
    only: its prefill is checked, not fitted). The attention efficiency comes first, from each row measured at two
    depths (pp512 and pp4096: the same matmuls, more attention), and prefill's fit takes the attention out of each row.
    An era with no HBM row of its own reads HBM at its eta times the HBM/GDDR ratio its backend's other era measured: an
    assumption, stated as one, since no row of that era measures an HBM card."""
    table = device_table()
    bound = set(_data().get("kquant_compute_bound", {}))
    every = [r for r in published_rows() if r["device"] in table and r.get("era") == era]
    # a K-quant row of a backend whose K-quant kernel is compute-bound fits that kernel's cost, nothing else
    rows = [r for r in every if not (r["backend"] in bound and r["weights"] == "kquant")]
    backends = {r["backend"] for r in rows}
    attention_of = {b: _fit_attention([r for r in rows if r["backend"] == b], table) for b in backends}
    attention = attention_of.get(backend)

    def fit(points_of: Any, usable: Any, *, own_only: bool = False) -> tuple[float, float] | None:
        own = [r for r in rows if r["backend"] == backend and usable(r)]
        if own_only and len(own) < 2:
            return None
        pool = own if len(own) >= 2 else [r for r in rows if r["backend"] != "cpu" and usable(r)]
        if backend == "cpu" and len(own) < 2:
            pool = own
        if not pool:
            return None
        slope, fixed = _fit_line([points_of(r) for r in pool])
        if own and pool is not own:  # one row of its own: the shared slope, its own fixed cost
            fixed = max(0.0, sum(y - slope * x for x, y in map(points_of, own)) / len(own))
        return slope, fixed

    def prefill_point(r: Mapping[str, Any]) -> tuple[float, float]:
        # the row's own attention (pp512: positions 0..511, 256 on average): at its own efficiency where the backend
        # has one, else with the matmuls
        flops = table[r["device"]].flops or 1.0
        attention_flops = r["attention_flops"] * r.get("pp_tokens", PP_TOKENS) / 2
        eff = attention_of.get(r["backend"])
        if eff:
            return 2 * r["active_params"] / flops, 1 / r["pp"] - attention_flops / (eff * flops)
        return (2 * r["active_params"] + attention_flops) / flops, 1 / r["pp"]

    def decode_point(r: Mapping[str, Any]) -> tuple[float, float]:
        return r["bytes_per_token"] / table[r["device"]].bandwidth_bytes_per_s, 1 / r["tg"]

    decode = fit(decode_point, lambda r: r.get("tg") and not r.get("experts") and not table[r["device"]].hbm)
    assert decode is not None, f"no published decode row for {backend}"
    eta, t0 = 1 / decode[0], decode[1]
    hbm = [decode_point(r) for r in rows
           if r["backend"] == backend and r.get("tg") and not r.get("experts") and table[r["device"]].hbm]  # fmt: skip
    eta_hbm = 1 / _fit_slope(hbm, t0) if hbm else None
    if eta_hbm is None:  # the ratio of an era that measured HBM itself (it borrows nothing back: no recursion)
        other = next((fitted(backend, e) for e in _eras(backend) if e != era and _measures_hbm(backend, e)), None)
        if other is not None:
            assert other.eta_hbm is not None
            eta_hbm = eta * other.eta_hbm / other.eta

    def prefillable(r: Mapping[str, Any]) -> bool:
        return bool(r.get("pp")) and bool(table[r["device"]].flops) and not r.get("prefill_held_out")

    def dense(r: Mapping[str, Any]) -> bool:  # an MoE row's prefill fits its experts' pass (below), not the slope
        return prefillable(r) and not r.get("experts")

    # float weights' own slope only from a backend's own float rows (two at least): how much faster its float
    # matmuls run than its quantized ones is the backend's, not a pool's
    prefill_float = fit(prefill_point, lambda r: dense(r) and r["weights"] == "float", own_only=True)
    prefill = fit(prefill_point, lambda r: dense(r) and (prefill_float is None or r["weights"] != "float"))
    from statistics import median

    kquant_ops = None
    if backend in bound:  # each dense K-quant row's decode beyond the fixed cost, as FLOPs per weight it multiplies by
        found = [(1 / r["tg"] - t0) * (table[r["device"]].flops or 0) / r["decode_params"]
                 for r in every if r["backend"] == backend and r["weights"] == "kquant" and r.get("tg")
                 and not r.get("experts")]  # fmt: skip
        kquant_ops = median(found) if found and min(found) > 0 else None
    dense_fit = Fit(eta, t0, prefill[0] if prefill else None, prefill[1] if prefill else 0.0, attention,
                    pp_slope_float=prefill_float[0] if prefill_float else None,
                    pp_t0_float_s=prefill_float[1] if prefill_float else 0.0, kquant_ops=kquant_ops,
                    eta_hbm=eta_hbm)  # fmt: skip
    # an MoE's routed experts, on the backend's MoE rows (its K-quant ones included: they fit nothing above): in
    # decode, what a row's time per token leaves once every weight it reads (its experts' included) is read at eta,
    # or multiplied at the K-quant kernel's pace where that is slower, and t0 is paid, per routed expert matrix it
    # multiplies by; in prefill, what a row's time leaves once its active parameters and attention are priced as a
    # dense model's is its micro-batch's pass over the experts, whose bytes over that time and the bandwidth are the
    # pass's efficiency (rows whose experts average EXPERT_BATCH_FULL tokens a micro-batch or more). The medians.
    per_matrix, passes = [], []
    for r in every:
        if r["backend"] != backend or not r.get("experts"):
            continue
        device, share = table[r["device"]], r["experts_used"] / r["experts"]
        bandwidth = device.bandwidth_bytes_per_s
        if r.get("tg"):
            per_matrix.append(max(0.0, 1 / r["tg"] - t0 - _row_reads_s(r, device, dense_fit)) / r["expert_matrices"])
        ubatch = min(r.get("pp_tokens", PP_TOKENS), r.get("n_ubatch", DEFAULT_UBATCH))
        if prefillable(r) and dense_fit.pp_slope is not None and ubatch * share >= EXPERT_BATCH_FULL:
            left = (1 / r["pp"] - _row_prefill_s(r, device, dense_fit)) * ubatch
            if left > 0:
                passes.append(_touched_bytes(r["expert_bytes"], share, ubatch) / (left * bandwidth))

    return dataclasses.replace(dense_fit, expert_matrix_s=median(per_matrix) if per_matrix else None,
                               expert_pass_eff=median(passes) if passes else None)  # fmt: skip


# An MoE's micro-batch passes over every routed expert it sends a token to (ggml-cuda's MMQ for mul_mat_id): one
# tile pass per expert, whatever its few tokens, and at the published rows' sizes of 16-64 tokens an expert it runs
# far under the dense kernels' rate (an RTX 3090 spends 50-58 ms a micro-batch on gpt-oss-20b's experts beyond their
# FLOPs at micro-batches of 128, 256 and 512: llama.cpp PR #20586). Under EXPERT_BATCH_FULL tokens an expert the pass
# shrinks in proportion (the RTX 4090's Qwen3-30B-A3B at micro-batch 64, 4 an expert, PR #15631; the 3090's gpt-oss
# at 16 and 32, PR #22298), never below reading the experts' bytes at the dense decode efficiency.
EXPERT_BATCH_FULL = 16


def _touched_bytes(expert_bytes: float, share: float, ubatch: int) -> float:
    """The bytes of the routed experts a micro-batch of `ubatch` tokens sends at least one token to, each token
    choosing `share` of them (taken as uniform and independent: 1 - (1 - share)^ubatch of them). Pure."""
    return expert_bytes * (1 - (1 - share) ** ubatch)


def expert_pass_s(
    expert_bytes: float, share: float, ubatch: int, bandwidth: float, eta: float, pass_eff: float
) -> float:
    """Seconds a micro-batch of `ubatch` prompt tokens spends passing over an MoE's routed experts (`expert_bytes` of
    them, `share` of them a token) beyond their FLOPs, on a device of `bandwidth` bytes/s: the experts it routes to
    at `pass_eff` of the bandwidth, in proportion under EXPERT_BATCH_FULL tokens an expert, never faster than their
    bytes at `eta`. Pure."""
    full = min(1.0, ubatch * share / EXPERT_BATCH_FULL)
    return _touched_bytes(expert_bytes, share, ubatch) / bandwidth * max(1 / eta, full / pass_eff)


def _expert_pass_per_token_s(
    expert_bytes: float, share: float, n_prompt: int, n_ubatch: int, device: DeviceSpeed, fit: Fit
) -> float:
    """expert_pass_s per prompt token, for a prompt of `n_prompt` tokens in micro-batches of `n_ubatch` on `device`,
    with `fit`'s efficiencies (a published row and a plan are priced by the same). Pure."""
    assert fit.expert_pass_eff is not None
    ubatch = max(1, min(n_prompt, n_ubatch))
    pass_s = expert_pass_s(expert_bytes, share, ubatch, device.bandwidth_bytes_per_s, fit.eta_of(device),
                           fit.expert_pass_eff)  # fmt: skip
    return pass_s / ubatch


def _row_kv_bytes(row: Mapping[str, Any], depth: float, n_ubatch: int | None = None) -> float:
    """KV cache bytes a published row's decoded token reads at `depth` (0 for a row that gives no `kv_cache`): every
    full-attention layer's cells up to the depth, a sliding-window layer's at most its cache's, which llama.cpp sizes
    at the window plus a micro-batch (`n_ubatch`, else the row's), padded to 256 cells (launcher.estimate's SWA
    cache)."""
    from launcher.estimate import swa_cache_cells

    kv = row.get("kv_cache")
    if not kv or depth <= 0:
        return 0.0
    swa_layers = kv.get("swa_layers", 0)
    ubatch = n_ubatch or row.get("n_ubatch", DEFAULT_UBATCH)
    # the estimate's own rule, for a context of the depth and one micro-batch (llama-bench's tg @ d, pp @ d)
    swa_cells = swa_cache_cells(math.ceil(depth) + ubatch, kv.get("window", 0), ubatch)
    full = (row["layers"] - swa_layers) * depth
    return float(kv["bytes_per_layer_position"] * (full + swa_layers * min(depth, swa_cells)))


def _row_attention_flops(row: Mapping[str, Any], positions: float) -> float:
    """Attention FLOPs of one token of a published row with `positions` cached before it: every layer's, a
    sliding-window layer's over at most its window (`kv_cache`)."""
    kv = row.get("kv_cache") or {}
    swa_layers = kv.get("swa_layers", 0)
    if not swa_layers:
        return float(row["attention_flops"] * positions)
    per_layer = row["attention_flops"] / row["layers"]
    return float(per_layer * ((row["layers"] - swa_layers) * positions + swa_layers * min(positions, kv["window"])))


def _row_reads_s(
    row: Mapping[str, Any], device: DeviceSpeed, fit: Fit, depth: float = 0, n_ubatch: int | None = None
) -> float:
    """Seconds a published row's decoded token spends on its weights and cache at `depth`: their bytes at the
    device's share of the bandwidth, or a K-quant kernel's arithmetic where the backend's is the slower (times()
    prices a plan so)."""
    nbytes = row["bytes_per_token"] + _row_kv_bytes(row, depth, n_ubatch)
    reads = nbytes / (fit.eta_of(device) * device.bandwidth_bytes_per_s)
    if fit.kquant_ops and device.flops and row["weights"] == "kquant":
        reads = max(reads, row["decode_params"] * fit.kquant_ops / device.flops)
    return float(reads)


def _row_prefill_s(
    row: Mapping[str, Any], device: DeviceSpeed, fit: Fit, n_prompt: int | None = None, depth: float = 0
) -> float:
    """Seconds per prompt token of a published row priced as a dense model: its active parameters at the fitted
    slope and fixed cost, its attention over a prompt of `n_prompt` tokens (the row's own by default) after `depth`
    cached ones. Pure."""
    assert fit.pp_slope is not None and device.flops
    slope, fixed = fit.pp_slope, fit.pp_t0_s
    if row["weights"] == "float" and fit.pp_slope_float is not None:
        slope, fixed = fit.pp_slope_float, fit.pp_t0_float_s
    seconds = slope * 2 * row["active_params"] / device.flops + fixed
    positions = depth + (n_prompt or row.get("pp_tokens", PP_TOKENS)) / 2
    eff = fit.attention_eff if fit.attention_eff else 1 / slope
    return seconds + _row_attention_flops(row, positions) / (eff * device.flops)


def _eras(backend: str) -> list[str | None]:
    """The eras `backend`'s published rows come from (None: today's)."""
    return sorted({r.get("era") for r in published_rows() if r["backend"] == backend}, key=lambda e: e or "")


def _measures_hbm(backend: str, era: str | None) -> bool:
    """Whether `backend`'s published rows of `era` decode a dense model on an HBM card (fitted's eta_hbm rows)."""
    table = device_table()
    return any(r.get("tg") and not r.get("experts") and r["device"] in table and table[r["device"]].hbm
               for r in published_rows() if r["backend"] == backend and r.get("era") == era)  # fmt: skip


def _fit_attention(rows: list[Mapping[str, Any]], table: Mapping[str, DeviceSpeed]) -> float | None:
    """Attention FLOPS / device FLOPS, the median over rows that measured prefill at two prompt lengths: the longer
    prompt's extra seconds per token are its extra attention (positions n/2 on average instead of 256)."""
    from statistics import median

    found = []
    for r in rows:
        flops = table[r["device"]].flops
        for deep in r.get("deep", ()):
            if not (flops and r.get("pp") and r["attention_flops"] and deep.get("test") == "pp"):
                continue
            extra_positions = deep.get("depth", 0) + deep["n_prompt"] / 2 - PP_TOKENS / 2
            extra_s = 1 / deep["t_per_s"] - 1 / r["pp"]
            if extra_positions > 0 and extra_s > 0:
                found.append(r["attention_flops"] * extra_positions / (extra_s * flops))
    return median(found) if found else None


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """y = a·x + b minimising Σ ((a·x + b - y) / y)²: relative error, so a fast row weighs as much as a slow one."""
    sw = sx = sy = sxx = sxy = 0.0
    for x, y in points:
        w = 1 / (y * y)
        sw, sx, sy, sxx, sxy = sw + w, sx + w * x, sy + w * y, sxx + w * x * x, sxy + w * x * y
    det = sw * sxx - sx * sx
    if len(points) < 2 or det <= 0:
        a = sum(y / x for x, y in points) / len(points)
        return a, 0.0
    a = (sw * sxy - sx * sy) / det
    b = (sy - a * sx) / sw
    if b < 0:  # a fixed cost below zero is no cost: fit the slope alone
        a = sxy / sxx
        b = 0.0
    return a, b


def _fit_slope(points: list[tuple[float, float]], fixed: float) -> float:
    """a in y = a·x + fixed minimising Σ ((a·x + fixed - y) / y)², the fixed part given."""
    return sum(x * (y - fixed) / (y * y) for x, y in points) / sum(x * x / (y * y) for x, y in points)


def predict_published(
    row: Mapping[str, Any], *, n_prompt: int | None = None, depth: float = 0, n_ubatch: int | None = None
) -> Speed:
    """The uncalibrated prediction for one published row (what the accuracy test and bench compare): decode at
    `depth` (llama-bench's tg @ d; the cache it reads from the row's `kv_cache`), prefill of `n_prompt` tokens after
    `depth` cached ones (None: the row's own prompt, `pp_tokens`, else llama-bench's 512), in micro-batches of
    `n_ubatch` (None: the row's own, else llama-bench's 512)."""
    n_prompt = n_prompt or row.get("pp_tokens", PP_TOKENS)
    n_ubatch = n_ubatch or row.get("n_ubatch", DEFAULT_UBATCH)
    device = device_table()[row["device"]]
    fit = fitted(device.backend, row.get("era"))
    tg = None
    if row["bytes_per_token"] is not None:  # a prefill-only row gives no size
        reads = _row_reads_s(row, device, fit, depth, n_ubatch)
        tg = 1 / (reads + row["expert_matrices"] * (fit.expert_matrix_s or 0.0) + fit.t0_s)
    pp = None
    if fit.pp_slope is not None and device.flops:
        seconds = _row_prefill_s(row, device, fit, n_prompt, depth)
        if row.get("experts") and fit.expert_pass_eff:
            share = row["experts_used"] / row["experts"]
            seconds += _expert_pass_per_token_s(row["expert_bytes"], share, n_prompt, n_ubatch, device, fit)
        pp = 1 / seconds
    return Speed(tg, pp)


def llmfit_published(row: Mapping[str, Any]) -> float:
    """llmfit's formula on a published row (bandwidth / (params x nominal bytes per param) x 0.55): the peer's
    figure printed beside ours, so the gap is measured (reference/speed.md "How others predict")."""
    device = device_table()[row["device"]]
    quant = row["model"].rsplit(" ", 1)[-1]
    nominal = {"Q4_K_M": 0.5, "Q4_0": 0.5, "F16": 2.0}.get(quant, 0.5)
    return device.bandwidth_bytes_per_s / (row["params"] * nominal) * 0.55


# -- a configuration of the plan ----------------------------------------------------------------------------------


def _device_of_layers(option: Option) -> dict[int, str]:
    return {i: d.name for d in option.estimate.devices for i in d.layers}


def _output_device(option: Option) -> str:
    """Where the output layer runs: the last GPU holding layers when every layer is offloaded (llama.cpp's ngl counts
    the output layer as one past the blocks), else the CPU."""
    gpus = [d.name for d in option.estimate.devices if d.name != "CPU" and d.layers]
    return gpus[-1] if gpus and option.n_gpu_layers > option.facts.n_layer else "CPU"


def bytes_per_token(option: Option, depth: int) -> dict[str, int]:
    """Bytes read per decoded token on each device of the option's estimate, at `depth` tokens of context. Pure."""
    return _added(_weight_bytes_per_token(option), _kv_bytes_per_token(option, depth))


def _added(first: Mapping[str, int], second: Mapping[str, int]) -> dict[str, int]:
    """Two per-device byte counts added up, device by device. Pure."""
    out = dict(first)
    for device, nbytes in second.items():
        out[device] = out.get(device, 0) + nbytes
    return out


def _weight_bytes_per_token(option: Option) -> dict[str, int]:
    """Weight bytes a decoded token reads on each device (bytes_per_token without the KV cache): the blocks' dense
    weights and the output layer where they live, and the share of the routed experts a token uses where they are
    kept (on the CPU with --cpu-moe). Pure."""
    facts, est = option.facts, option.estimate
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 0.0
    device_of = _device_of_layers(option)
    out: dict[str, int] = {d.name: 0 for d in est.devices}
    for layer in facts.layers:
        on = device_of.get(layer.index, "CPU")
        out[on] += layer.weight_bytes - layer.expert_bytes
        if layer.expert_bytes:
            kept = "CPU" if option.cpu_moe else on
            out[kept] = out.get(kept, 0) + round(layer.expert_bytes * share)
    output_device = _output_device(option)
    out[output_device] = out.get(output_device, 0) + facts.output_bytes
    return out


def _expert_matrices(option: Option) -> dict[str, int]:
    """Routed expert matrices a decoded token multiplies by on each device: each layer's stacked expert weights
    (gate, up and down, `ffn_*_exps.weight`, or a fused gate-up) times the experts a token uses, where the layer's
    experts are kept. Pure."""
    facts = option.facts
    if not facts.expert_count:
        return {}
    device_of = _device_of_layers(option)
    out: dict[str, int] = {}
    for layer in facts.layers:
        stacks = sum(
            1 for name, shape, _ in layer.tensors if "_exps." in name and name.endswith(".weight") and len(shape) == 3
        )
        if stacks:
            kept = "CPU" if option.cpu_moe else device_of.get(layer.index, "CPU")
            out[kept] = out.get(kept, 0) + stacks * facts.expert_used_count
    return out


def _kv_bytes_per_token(option: Option, depth: int) -> dict[str, int]:
    """KV cache bytes a decoded token reads at `depth` on each device (a sliding-window layer's cache holds at most
    its window's cells). Pure."""
    device_of = _device_of_layers(option)
    out: dict[str, int] = {}
    for cache in option.estimate.kv_caches:
        cells = max(1, cache.cells)
        for il, nbytes in zip(cache.layers, cache.layer_bytes, strict=False):
            per_cell = nbytes / (cells * max(1, cache.n_stream))
            device = device_of.get(il, "CPU")
            out[device] = out.get(device, 0) + round(per_cell * min(depth, cells))
    return out


def attention_flops(option: Option, depth: float) -> dict[str, float]:
    """Attention FLOPs of one token with `depth` positions before it, per device of the estimate: 2 x heads x (K + V
    head size) per layer and position (QK^T, then the weighted sum of V), a sliding-window layer at most its window
    and every layer at most its cache's cells. Pure."""
    out: dict[str, float] = {d.name: 0.0 for d in option.estimate.devices}
    for device, _shape, flops in _attention_layers(option, depth):
        out[device] = out.get(device, 0.0) + flops
    return out


def _attention_layers(option: Option, depth: float) -> list[tuple[str, AttentionShape, float]]:
    """(device, shape, attention FLOPs of one token at `depth`) for each layer that attends (see attention_flops)."""
    from launcher.measure.kernels import AttentionShape

    facts = option.facts
    device_of = _device_of_layers(option)
    cells = {il: max(1, cache.cells) for cache in option.estimate.kv_caches for il in cache.layers}
    out = []
    for layer in facts.layers:
        if not layer.has_kv or layer.index not in cells:
            continue
        positions = min(depth, cells[layer.index])
        if layer.swa and facts.sliding_window:
            positions = min(positions, facts.sliding_window)
        shape = AttentionShape(layer.n_head, layer.n_head_kv, layer.head_dim_k, layer.head_dim_v)
        flops = 2 * layer.n_head * (layer.head_dim_k + layer.head_dim_v) * positions
        out.append((device_of.get(layer.index, "CPU"), shape, flops))
    return out


def _attention_s(layers: list[tuple[str, AttentionShape, float]], devices: Mapping[str, DeviceSpeed],
                 kind: str | None, types: tuple[str, str], eff: float | None, on: DeviceSpeed | None = None
                 ) -> float:  # fmt: skip
    """Seconds of attention for `layers` on a backend with its own attention figures: each layer at its device's
    measured flash-attention rate for its shape and cache types (`kind`: decode or prefill; None: not flash
    attention, no measured rate applies), else at `eff` x the device's FLOPS (the fitted figure; 0 where it has
    none). `on`: every layer computed on that device (prefill). Pure."""
    from launcher.measure.kernels import rate_key

    seconds = 0.0
    for name, shape, flops in layers:
        device = on or devices.get(name)
        if device is None or not flops:
            continue
        rate = (device.kernel_rates or {}).get(rate_key(kind, *types, shape)) if kind else None
        if rate:
            seconds += flops / rate
        elif eff and device.flops:
            seconds += flops / (eff * device.flops)
    return seconds


def active_params(option: Option) -> float:
    """Parameters a prompt token multiplies by: the blocks' weights (MoE routed experts x used / total), no
    embeddings and no output layer (a prompt's logits are its last token's). Counted from the tensors' shapes;
    from the weights' bytes over the file's bits per weight where the shapes are unknown."""
    facts = option.facts
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 1.0
    if facts.tensor_shapes:
        total = 0.0
        for name, shape in facts.tensor_shapes.items():
            if name.startswith("blk."):
                elements = math.prod(shape)
                total += elements * share if "_exps" in name else elements
        return total
    if not facts.tensor_bytes_total:
        return 0.0
    per_param = facts.tensor_bytes_total / max(1, facts.n_params)
    experts = sum(layer.expert_bytes for layer in facts.layers)
    blocks = sum(layer.weight_bytes for layer in facts.layers) - experts * (1 - share)
    return max(0.0, blocks / per_param)


def float_share(option: Option) -> float:
    """The share of a prompt token's block parameters stored as floats (F16, BF16, F32): their matmuls take the
    backend's float prefill slope. 0 where the tensors' types are unknown."""
    facts = option.facts
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 1.0
    total = floats = 0.0
    for name, shape in facts.tensor_shapes.items():
        if not name.startswith("blk.") or len(shape) < 2:  # norms and biases: no matmul
            continue
        elements = math.prod(shape) * (share if "_exps" in name else 1.0)
        total += elements
        if facts.tensor_types_by_name.get(name, ("", 0))[0].upper() in FLOAT_WEIGHTS:
            floats += elements
    return floats / total if total else 0.0


def kquant_weights_per_token(option: Option) -> dict[str, float]:
    """K-quant (and i-quant) weights a decoded token multiplies by, per device of the option's estimate: the blocks'
    (MoE routed experts x used / total) where their layers sit, the output layer's where it lives (bytes_per_token's
    placement). Empty where the tensors' types are unknown. Pure."""
    return _kquant_weights(_matrices(option))


def _kquant_weights(matrices: Sequence[_Matrix]) -> dict[str, float]:
    """kquant_weights_per_token of matrices already listed (_matrices). Pure."""
    out: dict[str, float] = {}
    for m in matrices:
        if is_kquant(m.type_name):
            out[m.device] = out.get(m.device, 0.0) + m.k * m.rows * m.count
    return out


@dataclass(frozen=True)
class _Matrix:
    """One weight matrix a token multiplies by: where it is, its ggml type ("Q4_K"), row length and rows, and how
    many of it one token uses (a stack of MoE routed experts: used of total)."""

    device: str
    type_name: str
    k: int
    rows: int
    count: float
    output: bool


def _matrices(option: Option) -> list[_Matrix]:
    """Every weight matrix of the option's model that a decoded token multiplies by, placed as bytes_per_token places
    it: the blocks' 2-D (and stacked 3-D) weights, and the output layer (the token embeddings where tied). Empty where
    the tensors' shapes or types are unknown. Pure."""
    from launcher.measure.kernels import multiplies

    facts = option.facts
    types = facts.tensor_types_by_name
    if not types or not facts.tensor_shapes:
        return []
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 1.0
    device_of = _device_of_layers(option)
    out = []
    for name, shape in facts.tensor_shapes.items():
        if not multiplies(name, shape):
            continue
        type_name = types.get(name, ("", 0))[0]
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            expert = "_exps" in name
            device = "CPU" if expert and option.cpu_moe else device_of.get(int(index) if index.isdigit() else -1, "CPU")
            count = math.prod(shape[2:]) * (share if expert else 1.0)
            out.append(_Matrix(device, type_name, shape[0], shape[1], count, False))
        elif name == "output.weight" or (name == "token_embd.weight" and facts.output_tied):
            out.append(_Matrix(_output_device(option), type_name, shape[0], shape[1], 1.0, True))
    return out


def _weight_sets(matrices: Sequence[_Matrix]) -> dict[WeightSet, float]:
    """The weight sets launcher.measure.kernels times for `matrices` (kernels.weight_sets), each with the FLOPs per
    token it stands for. Pure."""
    from launcher.measure.kernels import weight_sets

    return weight_sets((m.type_name, m.k, m.rows, m.count, m.output) for m in matrices)


def _block_tensors(option: Option) -> dict[str, int]:
    """How many block tensors (blk.N.*) each device holds: a fixed cost per tensor where one was measured. Pure."""
    device_of = _device_of_layers(option)
    out: dict[str, int] = {}
    for name in option.facts.tensor_shapes:
        index = name.split(".", 2)[1] if name.startswith("blk.") else ""
        if index.isdigit():
            device = "CPU" if "_exps" in name and option.cpu_moe else device_of.get(int(index), "CPU")
            out[device] = out.get(device, 0) + 1
    return out


def _weights_s(matrices: Sequence[_Matrix], device: DeviceSpeed, kind: str) -> float | None:
    """Seconds per token `device` spends multiplying by `matrices`, at this host's measured rate for each of their
    weight sets (`kind`: decode, one token; prefill, a batch); None unless every set has one. Pure."""
    from launcher.measure.kernels import weight_key

    rates = device.kernel_rates or {}
    seconds = 0.0
    for weights, flops in _weight_sets(matrices).items():
        rate = rates.get(weight_key(kind, weights))
        if not rate:
            return None
        seconds += flops / rate
    return seconds if matrices else None


@dataclass(frozen=True)
class Times:
    """Predicted seconds per token by part, before calibration: decode's reads and fixed cost, decode's attention
    compute (on a backend with its own attention efficiency), prefill's matmuls and fixed cost (None: unknown) and
    prefill's attention at that efficiency (elsewhere it is counted with the matmuls)."""

    decode_s: float
    decode_attention_s: float
    prefill_s: float | None
    prefill_attention_s: float
    # prefill's attention runs decode's path: llama.cpp's CPU flash attention tiles a prompt's queries only for f16
    # (or f32) K and V of one type (ggml-cpu ops.cpp ggml_compute_forward_flash_attn_ext: use_tiled); a quantized
    # cache runs the same per-query vector loop as decode
    prefill_attention_as_decode: bool = False


def times(option: Option, devices: Mapping[str, DeviceSpeed], depth: float = 0, n_prompt: int = PP_TOKENS
          ) -> Times | None:  # fmt: skip
    """The parts of a token's time for `option`, decode at `depth` and a prompt of `n_prompt` tokens starting at
    `depth`; None when a device it uses has no figures (unknown, never guessed). Pure."""
    kv = _kv_bytes_per_token(option, round(depth))
    per_device = _added(_weight_bytes_per_token(option), kv)  # bytes_per_token, its KV part kept apart
    expert_matrices = _expert_matrices(option)
    settings = option.estimate.settings
    types = (settings.type_k, settings.type_v)
    fused = settings.flash_attn != "off"  # a measured rate is flash attention's: without it, attention is matmuls
    decode_layers = _attention_layers(option, depth)
    matrices = _matrices(option)
    kquant = _kquant_weights(matrices)
    tensors_on = _block_tensors(option)
    seconds = attention_s = t0 = 0.0
    used = []
    for name, nbytes in per_device.items():
        if not nbytes:
            continue
        device = devices.get(name)
        if device is None:
            return None
        fit = fitted(device.backend)
        # this host's measured kernels for its weights where it has them (then the cache is read at memory speed)
        timed = _weights_s([m for m in matrices if m.device == name], device, "decode") if device.kernel_rates else None
        if timed is not None:
            reads = timed + kv.get(name, 0) / (fit.eta_of(device) * device.bandwidth_bytes_per_s)
        else:
            reads = nbytes / (fit.eta_of(device) * device.bandwidth_bytes_per_s)
            if fit.kquant_ops and device.flops and kquant.get(name):
                reads = max(reads, kquant[name] * fit.kquant_ops / device.flops)
            reads += expert_matrices.get(name, 0) * (fit.expert_matrix_s or 0.0)
        seconds += reads + (device.tensor_overhead_s or 0.0) * tensors_on.get(name, 0)
        if fit.attention_eff or (fused and device.kernel_rates):
            mine = [layer for layer in decode_layers if layer[0] == name]
            attention_s += _attention_s(mine, devices, "decode" if fused else None, types, fit.attention_eff)
        t0 = max(t0, fit.t0_s)
        used.append(device)
    if not seconds:
        return None
    # prefill on the GPU that computes fastest (llama.cpp runs host weights' matmuls on the GPU for big batches); on
    # the CPU only when no GPU holds a layer
    gpus = [d for d in used if d.backend != "cpu"]
    main = max(gpus or used, key=lambda d: d.flops or 0.0)
    prefill_s: float | None = None
    prefill_attention_s = 0.0
    fit = fitted(main.backend)
    params = active_params(option)
    as_decode = settings.type_k != settings.type_v or settings.type_k not in ("f16", "f32")
    # the host computing the prompt: its measured kernels for the blocks' weights (the output layer multiplies the
    # last token only), else the fitted slope over its FLOPS
    timed = _weights_s([m for m in matrices if not m.output], main, "prefill") if main.kernel_rates else None
    if timed is not None or (main.flops and fit.pp_slope is not None and params):
        if timed is not None:
            prefill_s = timed + fit.pp_t0_s
        else:
            assert main.flops and fit.pp_slope is not None
            floats = float_share(option) if fit.pp_slope_float is not None else 0.0
            slope = fit.pp_slope + floats * ((fit.pp_slope_float or fit.pp_slope) - fit.pp_slope)
            prefill_s = slope * 2 * params / main.flops + (fit.pp_t0_float_s if floats > 0.5 else fit.pp_t0_s)
        prompt_layers = _attention_layers(option, depth + n_prompt / 2)
        flops = sum(layer[2] for layer in prompt_layers)
        if (fit.attention_eff or main.kernel_rates) and fused:
            prefill_attention_s = _attention_s(prompt_layers, devices, "prefill", types, fit.attention_eff, on=main)
        elif main.flops:  # flash attention runs as a matmul here (a GPU's), or no flash attention: KQ and KQV are
            prefill_s += (fit.pp_slope or 1.0) * flops / main.flops  # matmuls
            as_decode = False
        if main.backend != "cpu":
            trip = host_weights_trip_s(option, main, n_prompt)
            prefill_s = None if trip is None else prefill_s + trip
            facts = option.facts
            if prefill_s is not None and facts.expert_count and fit.expert_pass_eff:
                # the micro-batch's pass over the routed experts, wherever they are kept (host-kept ones are copied
                # over for the batch, host_weights_trip_s, and multiplied here)
                share = facts.expert_used_count / facts.expert_count
                stored = sum(layer.expert_bytes for layer in facts.layers)
                prefill_s += _expert_pass_per_token_s(stored, share, n_prompt, settings.n_ubatch, main, fit)
    return Times(seconds + t0, attention_s, prefill_s, prefill_attention_s, as_decode and prefill_attention_s > 0)


OFFLOAD_MIN_BATCH = 32  # ggml-cuda: a batch this big runs host weights' matmuls on the GPU (GGML_OP_OFFLOAD_MIN_BATCH)


def host_weights_trip_s(option: Option, gpu: DeviceSpeed, n_prompt: int) -> float | None:
    """Seconds per prompt token that host-resident block weights spend crossing to the GPU in a partial offload:
    llama.cpp's CUDA backend copies every host weight an op uses for each micro-batch of 32 tokens or more, so a
    prompt token pays the host weights (routed experts whole: the batch's tokens pick all of them) over the link,
    divided by the micro-batch's tokens. 0 when every block is on the GPU; None when the link is unknown. (A prompt
    under 32 tokens computes the host layers on the CPU instead; that is priced at the GPU's rate, a known
    approximation for prompts that short.)"""
    device_of = _device_of_layers(option)
    host = 0
    for layer in option.facts.layers:
        on_cpu = device_of.get(layer.index, "CPU") == "CPU"
        host += layer.weight_bytes if on_cpu else (layer.expert_bytes if option.cpu_moe else 0)
    ubatch = min(n_prompt, option.estimate.settings.n_ubatch)
    if not host or ubatch < OFFLOAD_MIN_BATCH:
        return 0.0
    if not gpu.link_bytes_per_s:
        return None
    return host / (gpu.link_bytes_per_s * ubatch)


def predict(option: Option, devices: Mapping[str, DeviceSpeed], depth: float = 0, *, n_prompt: int = PP_TOKENS,
            calibration: Calibration | None = None) -> Speed:  # fmt: skip
    """Decode tokens/s at `depth` and prefill tokens/s of a prompt of `n_prompt` tokens starting at `depth`, with
    `devices` naming each device of the option's estimate (CPU included), scaled by this machine's `calibration`
    where given. A device without figures makes the prediction unknown (None), never a guess. Pure."""
    parts = times(option, devices, depth, n_prompt)
    return Speed(None, None) if parts is None else rates(parts, calibration)


def rates(parts: Times, calibration: Calibration | None = None) -> Speed:
    """Decode and prefill tokens/s from a token's predicted parts, each scaled by its calibration ratio. Pure."""
    tg_ratio = calibration.factor if calibration else 1.0
    pp_ratio = calibration.pp_factor if calibration and calibration.pp_factor else 1.0
    attention_ratio = calibration.attention_factor if calibration and calibration.attention_factor else None
    prefill_attention = calibration.prefill_attention_factor if calibration else None
    loop = calibration.prefill_loop_factor if calibration and parts.prefill_attention_as_decode else None
    if parts.prefill_attention_as_decode:  # decode's loop: prefill's own ratio on it, else decode's
        prefill_attention = loop or attention_ratio
    # decode's attention where its two decodes could not tell it apart: prefill's on the same loop (measured over
    # seconds of batched work) before the weights' ratio, which left SmolLM2 F16's decode at depth 2048 +50% on this
    # project's 2-core test machine
    decode_attention = parts.decode_attention_s / (attention_ratio or loop or tg_ratio)
    tg = 1 / (parts.decode_s / tg_ratio + decode_attention)
    pp = None
    if parts.prefill_s is not None:
        pp = 1 / (parts.prefill_s / pp_ratio + parts.prefill_attention_s / (prefill_attention or attention_ratio
                                                                              or pp_ratio))  # fmt: skip
    return Speed(tg, pp)


def solve_ratios(short: tuple[Times, float], deep: tuple[Times, float] | None = None,
                 fill: tuple[Times, float] | None = None, deep_fill: tuple[Times, float] | None = None,
                 shallow: tuple[Times, float] | None = None) -> dict[str, float | None]:  # fmt: skip
    """A warm-up's measured / predicted ratios from the server's own figures. Each argument is the parts predicted
    for one measurement and the tokens/s the server measured: decode at a short prompt (`short`), decode after the
    full fill (`deep`), the fill's prefill (`fill`, every depth from 0), a short prompt's prefill after the fill
    (`deep_fill`) and a prompt of a few hundred tokens at an empty context (`shallow`). Where attention has its own
    efficiency (a CPU), two measurements at different depths separate it from the rest: the decodes give reading
    the weights (tg_ratio) and decode's attention (attention_ratio), two prefills the matmuls (pp_ratio) and
    prefill's attention (prefill_attention_ratio), which runs on another path (llama.cpp's CPU flash attention: a
    vector loop per token in decode, tiles of queries in prefill), unless the cache's types make prefill run
    decode's loop too: then it is prefill_loop_ratio, and where the prefills cannot tell it, decode's ratio prices
    it (a calibration keeps the two apart: a plan with the other cache takes the other). A ratio the measurements
    cannot tell apart is None; from one prefill (the shallowest: the matmuls' largest share), pp_ratio takes
    attention at decode's ratio, and is None where attention so priced leaves the matmuls under MIN_PREFILL_SHARE
    of its measured time. Pure."""
    ratios: dict[str, float | None] = {"tg_ratio": None, "attention_ratio": None, "pp_ratio": None,
                                       "prefill_attention_ratio": None, "prefill_loop_ratio": None}  # fmt: skip
    (p1, tg1) = short
    decode = None
    if deep is not None:
        decode = _two_parts((p1.decode_s, p1.decode_attention_s, 1 / tg1),
                            (deep[0].decode_s, deep[0].decode_attention_s, 1 / deep[1]))  # fmt: skip
    read, attention = decode if decode is not None else (1 / tg1 / (p1.decode_s + p1.decode_attention_s), None)
    ratios["tg_ratio"] = _ratio(1 / read)
    if attention is not None:
        ratios["attention_ratio"] = _ratio(1 / attention)
    prefills = [m for m in (shallow, fill) if m is not None and m[0].prefill_s]
    if not prefills:
        return ratios

    def point(m: tuple[Times, float]) -> tuple[float, float, float]:
        return m[0].prefill_s or 0.0, m[0].prefill_attention_s, 1 / m[1]

    # two prefills at different depths separate prefill's attention from its matmuls, the pair furthest apart first.
    # Where prefill runs decode's attention loop (a quantized cache on a CPU), prefill's own two points (seconds of
    # batched work each) price it more directly than two decodes of a few dozen tokens, so they are tried first too
    on_loop = prefills[0][0].prefill_attention_as_decode
    # the fill and a few words after it: on decode's loop, too alike to beat decode's ratio
    pairs = [(shallow, fill)] + ([] if on_loop and attention else [(fill, deep_fill)])
    for a, b in pairs:
        if a is not None and b is not None and a[0].prefill_s and b[0].prefill_s:
            prefill = _two_parts(point(a), point(b))
            if prefill is not None:
                ratios["pp_ratio"] = _ratio(1 / prefill[0])
                ratios["prefill_loop_ratio" if on_loop else "prefill_attention_ratio"] = _ratio(1 / prefill[1])
                return ratios
    matmul, attention_s, measured_s = point(prefills[0])
    spent = measured_s - (attention * attention_s if attention is not None else 0.0)
    matmul += 0.0 if attention is not None else attention_s
    # the matmuls' time is what is left of the prefill once attention is priced; where attention took most of it,
    # the rest is a small difference of two large figures (a 135M model's 2k fill on a CPU: ratios of 6 and 16 came
    # out of such), so it is kept only where it is a fair share of the measured time
    if spent >= MIN_PREFILL_SHARE * measured_s:
        ratios["pp_ratio"] = _ratio(matmul / spent)
    return ratios


MIN_PREFILL_SHARE = 0.25  # of a fill's measured time, at the least, left to the matmuls for a prefill ratio
MIN_SHARE_GAP = 0.2  # attention's share of the deeper point over the shallower one's, at the least


def _two_parts(first: tuple[float, float, float], second: tuple[float, float, float]) -> tuple[float, float] | None:
    """(x, y) with measured = x · base + y · attention at two points (base, attention, measured seconds), both
    positive; None when the points do not tell them apart: attention under a tenth of the time at the deeper one,
    attention's share of the two points too alike (MIN_SHARE_GAP: then a measurement's noise swings both factors
    wildly; a CPU's fill and a short prompt after it, both mostly attention, gave a prefill ratio of 12), or the
    measurements contradict the model (a factor at or below zero)."""
    (b1, a1, m1), (b2, a2, m2) = first, second
    if a2 <= 0.1 * b2 or a2 / (a2 + b2) - a1 / (a1 + b1) < MIN_SHARE_GAP:
        return None
    det = b1 * a2 - b2 * a1
    if det <= 0:
        return None
    x = (m1 * a2 - m2 * a1) / det
    y = (b1 * m2 - b2 * m1) / det
    return (x, y) if x > 0 and y > 0 else None


def _ratio(value: float) -> float | None:
    return round(value, 4) if 0 < value < math.inf else None


# -- this machine ---------------------------------------------------------------------------------------------------


def machine_speeds(machine: HardwareSnapshot, options: Sequence[Option] = ()) -> dict[str, DeviceSpeed]:
    """What each device of `machine` offers, by the plan's device names. A GPU's own figures first (NVML's clocks
    and bus, or a profile's `bandwidth` / `flops`), then its name in the table, each figure on its own; a GPU with
    no bandwidth from either has no speed (unknown, never guessed). The host: a profile's bandwidth and FLOPS, else
    the measured ones (not for a described machine: its host is not this one), and, for the `options` that attend
    on the CPU, the flash-attention rate of their shapes and cache types measured on this host (host_kernels)."""
    table = device_table()
    out: dict[str, DeviceSpeed] = {}
    for device in machine.devices:
        entry = _table_entry(device.name, table)
        known = table[entry] if entry else None
        bandwidth = device.memory_bandwidth_bytes_per_s or (known.bandwidth_bytes_per_s if known else None)
        if not bandwidth:
            continue
        flops = device.fp16_flops or (known.flops if known else None)
        backend = known.backend if known else _BACKEND_OF_KIND.get(device.kind, device.kind)
        link = device.host_link_bytes_per_s or (known.link_bytes_per_s if known else None)
        bus = device.memory_bus_width_bits
        hbm = bus >= HBM_BUS_BITS if bus else bool(known and known.hbm)
        out[f"GPU{device.index}"] = DeviceSpeed(bandwidth, flops, backend, None if device.unified else link, hbm=hbm)
    host, host_flops = machine.host_bandwidth_bytes_per_s, machine.host_flops
    if not machine.described and (host is None or host_flops is None):
        measured = host_figures()
        host = host or measured.bandwidth_bytes_per_s
        host_flops = host_flops or measured.flops
    if host:
        rates, overhead = None, None
        if not machine.described:  # a described machine's host is not this one
            rates = host_kernels(_attention_wanted(options), _weights_wanted(options)) or None
            if any(d.name == "CPU" and d.layers for o in options for d in o.estimate.devices):
                overhead = host_tensor_overhead()
        out["CPU"] = DeviceSpeed(host, host_flops, "cpu", kernel_rates=rates, tensor_overhead_s=overhead)
    return out


def speed_figures(machine: HardwareSnapshot, speeds: Mapping[str, DeviceSpeed]) -> dict[str, dict[str, Any]]:
    """What `fitquant hw` shows: each device's bandwidth and FLOPS that plans predict from (machine_speeds), with where
    each came from; a GPU with no bandwidth anywhere is listed as unknown (None). Pure."""
    out: dict[str, dict[str, Any]] = {}
    for device in machine.devices:
        name = f"GPU{device.index}"
        figures = speeds.get(name)
        own = "profile" if machine.described else "NVML"
        # machine_speeds takes a device's own bandwidth first, else the table's: any other figure is the table's
        source = own if device.memory_bandwidth_bytes_per_s else "table" if figures else None
        out[name] = {
            "name": device.name,
            "bandwidth_bytes_per_s": figures.bandwidth_bytes_per_s if figures else None,
            "flops": figures.flops if figures else None,
            "flops_precision": "fp16",
            "backend": figures.backend if figures else None,
            "source": source,
        }
    cpu = speeds.get("CPU")
    if cpu is not None:
        given = machine.host_bandwidth_bytes_per_s is not None
        out["CPU"] = {
            "name": machine.cpu.model,
            "bandwidth_bytes_per_s": cpu.bandwidth_bytes_per_s,
            "flops": cpu.flops,
            "flops_precision": "fp32",
            "backend": "cpu",
            "source": "profile" if given else "measured",
        }
    return out


def _attention_wanted(options: Sequence[Option]) -> list[tuple[str, str, str, AttentionShape]]:
    """The (kind, type_k, type_v, shape) of every layer the `options` attend with on the CPU under flash attention:
    decode for a layer kept there, prefill too where no GPU holds a layer (the CPU then computes the prompt)."""
    wanted: dict[tuple[str, str, str, AttentionShape], None] = {}
    for option in options:
        settings = option.estimate.settings
        if settings.flash_attn == "off":
            continue
        layers = _attention_layers(option, 1)
        on_gpu = any(device != "CPU" for device, _, _ in layers)
        for device, shape, _ in layers:
            if device == "CPU":
                for kind in ("decode",) if on_gpu else ("decode", "prefill"):
                    wanted[(kind, settings.type_k, settings.type_v, shape)] = None
    return list(wanted)


def _weights_wanted(options: Sequence[Option]) -> list[tuple[str, WeightSet]]:
    """The (kind, weight set) of the weights the `options` multiply by on the CPU: decode for the matrices kept there,
    prefill for every block's where no GPU holds a layer (the CPU then computes the prompt)."""
    wanted: dict[tuple[str, WeightSet], None] = {}
    for option in options:
        matrices = _matrices(option)
        on_cpu = [m for m in matrices if m.device == "CPU"]
        for weights in _weight_sets(on_cpu):
            wanted[("decode", weights)] = None
        if not any(d.name != "CPU" and d.layers for d in option.estimate.devices):
            for weights in _weight_sets([m for m in matrices if not m.output]):
                wanted[("prefill", weights)] = None
    return list(wanted)


def attention_measured(option: Option, devices: Mapping[str, DeviceSpeed]) -> bool:
    """Whether every attention layer the option keeps on the CPU has this host's measured flash-attention rate,
    decode and prefill (its predictions at depth are then this host's, not the fitted figure's). Pure."""
    from launcher.measure.kernels import rate_key

    wanted = _attention_wanted([option])
    rates = devices["CPU"].kernel_rates if "CPU" in devices else None
    return bool(wanted) and all(rate_key(*w) in (rates or {}) for w in wanted)


# HBM stacks are 1024 bits wide each (an A100 reads 5120 bits, an H100 SXM 5120); GDDR buses are 512 bits at most
HBM_BUS_BITS = 1024
_BACKEND_OF_KIND = {"cuda": "cuda", "rocm": "rocm", "metal": "metal"}  # a device kind's fitted constants


# -- a device's figures as a person writes them (a profile's `bandwidth` and `flops`) -------------------------------

_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z/]+)\s*$")
_BANDWIDTH_UNITS = {"mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12, "mib/s": 2.0**20, "gib/s": 2.0**30, "tib/s": 2.0**40}
_FLOPS_UNITS = {"gflops": 1e9, "tflops": 1e12, "pflops": 1e15}
MAX_BANDWIDTH = 1e15  # bytes/s: far above any device (an H200 reads 4.8e12)
MAX_FLOPS = 1e18  # far above any device (a B200 is about 2.3e15 dense FP16)


def parse_bandwidth(text: str) -> float:
    """Bytes per second from '936GB/s', '1.5 TB/s' or '400GiB/s'. Raises ValueError (reads after a field's name)."""
    return _parse_rate(text, _BANDWIDTH_UNITS, MAX_BANDWIDTH, "a bandwidth like 936GB/s or 1.5TB/s")


def parse_flops(text: str) -> float:
    """FLOPS from '142TFLOPS', '989 TFLOPS' or '1.2PFLOPS' (dense FP16). Raises ValueError."""
    return _parse_rate(text, _FLOPS_UNITS, MAX_FLOPS, "FLOPS like 142TFLOPS (dense FP16)")


def _parse_rate(text: str, units: Mapping[str, float], limit: float, like: str) -> float:
    from launcher.units import shown_value

    match = _RATE.match(text) if isinstance(text, str) and len(text) <= 40 else None
    scale = units.get(match.group(2).lower()) if match else None
    if match is None or scale is None:
        raise ValueError(f"must be {like}, got {shown_value(text)}")
    value = float(match.group(1)) * scale
    if not 0 < value <= limit:
        raise ValueError(f"must be more than 0 and at most {limit:.0e} per second, got {shown_value(text)}")
    return value


# -- calibration: what this machine measured ------------------------------------------------------------------------


def calibration(machine: HardwareSnapshot, backend: str, version: str | None, quant: str | None = None,
                model: str | None = None) -> Calibration | None:  # fmt: skip
    """The median measured / predicted ratios of this machine's record (launcher.record.entries) for one backend and
    build (decode; prefill and attention where runs measured them); None when it has no such run.

    The runs most like the one predicted are taken first. For the weights' ratios (decode, prefill): runs of the same
    `model` (launcher.record.model_key) and `quant` type, else of that type on any model, else of the same model, else
    every run. A CPU's kernels differ by type (this project's 2-core test machine decodes an F16 135M model's weights
    in 2.6 ms of compute a token, its Q4_1 in 6.6), and a small model's fixed cost per token differs by model (its
    graph's size), which the prediction does not price: a model's own run carries both. For attention (it reads the KV
    cache, whatever the weights' type): the model's own runs where it has any (its heads' shapes; where none of them
    could tell attention apart, e.g. sliding-window layers leave it too small a share, another model's ratio would
    misprice it), else every run. A run flagged slow (probable CPU fallback) is left out: it measured a fault, and
    folding it in would hide the next one; so is a run measured against another form of the prediction
    (MODEL_VERSION), and any ratio outside PLAUSIBLE_RATIO (a CPU-only run has no slow finding: a warm-up decode
    timed through a stall of the machine once led `fitquant bench` to predict 0.3 tokens/s for a 130 tokens/s model)."""
    from statistics import median

    from launcher.record import entries

    runs = [e for e in entries(machine) if e.get("backend") == backend and e.get("version") == version
            and isinstance(e.get("speed"), dict) and e["speed"].get("model_version") == MODEL_VERSION
            and not e["speed"].get("finding")]  # fmt: skip

    def ratios(found: list[dict[str, Any]], key: str) -> list[float]:
        values = [e["speed"].get(key) for e in found]
        lo, hi = PLAUSIBLE_RATIO
        return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi]

    def first(key: str, *scopes: list[dict[str, Any]]) -> tuple[list[float], int]:
        """The ratios of the first scope that has any, and which scope that was."""
        for n, scope in enumerate(scopes):
            if values := ratios(scope, key):
                return values, n
        return [], -1

    def of_type(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in found if quant is not None and str(e.get("quant", "")).upper() == quant.upper()]

    mine = [e for e in runs if model is not None and e.get("model") == model]
    weights = (of_type(mine), of_type(runs), mine, runs)
    tg, scope = first("tg_ratio", *weights)
    if not tg:
        return None

    def middle(values: list[float]) -> float | None:
        return round(median(values), 4) if values else None

    attention = mine or runs
    pp, pp_scope = first("pp_ratio", *weights)
    return Calibration(round(median(tg), 4), len(tg), middle(pp), middle(ratios(attention, "attention_ratio")),
                       middle(ratios(attention, "prefill_attention_ratio")),
                       middle(ratios(attention, "prefill_loop_ratio")), same_model=scope in (0, 2),
                       pp_same_model=pp_scope in (0, 2))  # fmt: skip


# measured / predicted ratios a calibration takes: the uncalibrated model is within 25% of published decode and at
# worst 4.5x off a published prefill (the L40S's F16); a ratio past these is a fault of that measurement
PLAUSIBLE_RATIO = (0.2, 5.0)
COPY_BYTES = 64 * 1024**2  # per thread: well past any CPU cache
COPY_SECONDS = 0.4
MATMUL_SIZE = 1024  # an FP32 matrix product this size: compute-bound, in cache, on every core
MATMUL_SECONDS = 0.4


@dataclass(frozen=True)
class HostFigures:
    """The host's measured memory bandwidth (bytes/s) and FP32 FLOPS (None: could not be measured)."""

    bandwidth_bytes_per_s: float | None
    flops: float | None


def host_figures(*, refresh: bool = False) -> HostFigures:
    """The host's memory bandwidth (a short copy on every core at once, read + write bytes over the time) and its
    FP32 FLOPS (a short matrix product on every core), measured once per machine and kept in the user's cache folder
    (a fact of the machine, like the llama.cpp builds beside it: not under FITQUANT_HOME). Measured, not read from a
    spec sheet: a virtual machine's cores are what it gets, not what the chip offers."""
    import platformdirs

    path = Path(platformdirs.user_cache_dir("fitquant")) / "host-speed.json"
    key = _host_key()
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("host") == key and cached.get("bytes_per_s", 0) > 0 and cached.get("flops", 0) > 0:
                return HostFigures(float(cached["bytes_per_s"]), float(cached["flops"]))
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    measured = HostFigures(measure_copy_bandwidth(), measure_matmul_flops())
    if measured.bandwidth_bytes_per_s and measured.flops:
        from launcher.paths import write_private

        write_private(path, json.dumps({"host": key, "bytes_per_s": measured.bandwidth_bytes_per_s,
                                        "flops": measured.flops}))  # fmt: skip
    return measured


def host_kernels(
    wanted: Sequence[tuple[str, str, str, AttentionShape]],
    weights: Sequence[tuple[str, WeightSet]] = (),
    *,
    refresh: bool = False,
) -> dict[str, float]:
    """This host's llama.cpp CPU kernels (FLOPs/s, launcher.measure.kernels): the flash-attention rate for each wanted
    (kind, type_k, type_v, shape), by rate_key, and the matrix products' for each (kind, weight set) in `weights`, by
    weight_key, timed on as many threads as llama.cpp starts (llama_threads), once per machine, threads and
    llama-cpp-python version, and kept beside host-speed.json. What could not be timed is left out (the fitted
    figures price it)."""
    from launcher.measure.kernels import measure_rates, rate_key, weight_key

    if not wanted and not weights:
        return {}
    known = _kept_kernels()
    attention = {rate_key(*w): w for w in wanted}
    matrices = {weight_key(*w): w for w in weights}
    missing = [w for k, w in attention.items() if refresh or k not in known]
    missing_weights = [w for k, w in matrices.items() if refresh or k not in known]
    if missing or missing_weights:
        _keep_kernels(measure_rates(missing, weights=missing_weights, threads=llama_threads()))
        known = _kept_kernels()
    return {k: known[k] for k in [*attention, *matrices] if k in known}


OVERHEAD_KEY = "tensor overhead"  # its entry among the kept kernel figures (seconds, not FLOPs/s)


def host_tensor_overhead(*, refresh: bool = False) -> float | None:
    """Seconds per block tensor llama.cpp spends on a decoded token beyond its matrix products on this host,
    measured once (per machine, threads and llama-cpp-python version, kept with host_kernels' rates) by decoding
    the embedded model with llama.cpp itself (launcher.measure.kernels.measure_tensor_overhead); None where it could
    not be."""
    from launcher.embedded import embedded_model_path
    from launcher.errors import CatalogError
    from launcher.measure.kernels import measure_tensor_overhead

    known = _kept_kernels()
    if OVERHEAD_KEY in known and not refresh:
        return known[OVERHEAD_KEY]
    try:
        model = embedded_model_path()
    except CatalogError:  # not installed: the fitted fixed cost alone
        return None
    measured = measure_tensor_overhead(model, threads=llama_threads())
    if measured is None:
        return None
    _keep_kernels({OVERHEAD_KEY: max(measured, 1e-12)})
    return measured


def _kernels_file() -> tuple[Path, str]:
    import platformdirs

    from launcher.version import llama_cpp_python_version

    path = Path(platformdirs.user_cache_dir("fitquant")) / "host-kernels.json"
    key = f"{_host_key()} | {llama_threads()} threads | llama-cpp-python {llama_cpp_python_version() or 'none'}"
    return path, key


def _kept_kernels() -> dict[str, float]:
    """The kernel figures kept for this host, threads and llama-cpp-python version ({} if none, or another's)."""
    path, key = _kernels_file()
    try:
        cached = json.loads(path.read_text())
        if cached.get("host") == key and isinstance(cached.get("rates"), dict):
            return {str(k): float(v) for k, v in cached["rates"].items() if isinstance(v, (int, float)) and v > 0}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return {}


def _keep_kernels(measured: Mapping[str, float]) -> None:
    if not measured:
        return
    from launcher.paths import write_private

    path, key = _kernels_file()
    write_private(path, json.dumps({"host": key, "rates": {**_kept_kernels(), **measured}}))


def llama_threads() -> int:
    """The threads llama.cpp computes on by default: one per physical core (cpu_get_num_math; psutil's count of
    physical cores stands for it), else every logical one."""
    import os

    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _host_key() -> str:
    import platform

    import psutil

    return f"{platform.machine()} {platform.processor()} {psutil.cpu_count()} cpus {psutil.virtual_memory().total} B"


def measure_copy_bandwidth(threads: int | None = None, seconds: float = COPY_SECONDS) -> float | None:
    """Bytes per second moved by `threads` copies running at once (numpy releases the GIL while copying)."""
    import threading
    import time

    try:
        import numpy as np
    except ImportError:
        return None
    import os

    count = threads or os.cpu_count() or 1
    # both buffers touched before the clock starts: a first copy into fresh pages times the page faults
    pairs = [(np.ones(COPY_BYTES, dtype=np.uint8), np.zeros(COPY_BYTES, dtype=np.uint8)) for _ in range(count)]
    for src, dst in pairs:
        np.copyto(dst, src)
    moved = [0] * count
    deadline = time.perf_counter() + seconds

    def work(i: int) -> None:
        src, dst = pairs[i]
        while time.perf_counter() < deadline:
            np.copyto(dst, src)
            moved[i] += 2 * COPY_BYTES  # read and written

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    total: int = 0
    for n in moved:
        total += n
    return total / elapsed if elapsed > 0 and total else None


def measure_matmul_flops(seconds: float = MATMUL_SECONDS) -> float | None:
    """FP32 FLOPS of a square matrix product, repeated for `seconds` (numpy's BLAS uses every core)."""
    import time

    try:
        import numpy as np
    except ImportError:
        return None
    n = MATMUL_SIZE
    a = np.full((n, n), 0.5, dtype=np.float32)
    b = np.full((n, n), 0.25, dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)  # the first pays for threads starting
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        np.matmul(a, b, out=out)
        done += 1
    return 2 * n**3 * done / elapsed if done and elapsed > 0 else None


def measured_speed(reply: ChatReply, *, ollama: bool) -> Speed:
    """Decode and prefill tokens/s as the server measured them for one reply: llama-server's `timings`
    (predicted_per_second, prompt_per_second), Ollama's token counts over its durations (nanoseconds). Pure."""
    timings = reply.timings
    if ollama:
        tg_ns, pp_ns = timings.get("eval_duration"), timings.get("prompt_eval_duration")
        tg = reply.completion_tokens / (tg_ns / 1e9) if reply.completion_tokens and tg_ns else None
        pp = reply.prompt_tokens / (pp_ns / 1e9) if reply.prompt_tokens and pp_ns else None
        return Speed(tg, pp)
    tg, pp = timings.get("predicted_per_second"), timings.get("prompt_per_second")
    return Speed(tg if tg and tg > 0 else None, pp if pp and pp > 0 else None)


# ---------------------------------------------------------------------------------------------------------
# K/V cache types a CUDA build runs flash attention for on the GPU

# A CUDA build compiles FlashAttention vector kernels only for the K-V type pairs of GGML_CUDA_FA_QUANTS (default
# "q4_0-q4_0;q8_0-q8_0;f16-f16;bf16-bf16", f16-f16 always; "all" for every pair of these types). Any other pair is
# converted to f16 on every step ("no FlashAttention vector kernel compiled for K/V types ..., converting K and V to
# f16 instead (slow)"): see ggml/CMakeLists.txt, ggml/cmake/common.cmake ggml_cuda_fattn_vec_instances and
# ggml/src/ggml-cuda/fattn.cu ggml_cuda_flash_attn_ext_vec at llama.cpp 0c1e570. The build prints its set in the
# system info line (`CUDA : ARCHS = ... | FA_QUANTS = q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16 | ...`).
CUDA_FA_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
DEFAULT_CUDA_FA_QUANTS = "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"
_KV_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5,
            "iq4_nl": 4.5}  # fmt: skip


def parse_fa_quants(text: str) -> frozenset[tuple[str, str]]:
    """The K-V pairs of a build's FA_QUANTS ("all", or "q8_0-q8_0,f16-f16" / ';'-separated); f16-f16 is always
    compiled. ValueError for a pair of types llama.cpp does not know."""
    value = text.strip().lower()
    if value == "all":
        return frozenset((k, v) for k in CUDA_FA_TYPES for v in CUDA_FA_TYPES)
    pairs = {("f16", "f16")}
    for item in re.split(r"[,;]", value):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("-")
        if not sep or k not in CUDA_FA_TYPES or v not in CUDA_FA_TYPES:
            raise ValueError(f"not a FlashAttention K-V pair: {item!r} (types: {', '.join(CUDA_FA_TYPES)})")
        pairs.add((k, v))
    return frozenset(pairs)


def nearest_kv_pair(type_k: str, type_v: str, compiled: frozenset[tuple[str, str]]) -> tuple[str, str]:
    """The pair the build runs on the GPU closest to (type_k, type_v): the asked pair when compiled (f32 runs as
    f16); else the smallest compiled pair at least as precise as each of them; else the one that loses the least
    precision."""
    asked = (type_k, type_v)
    as_run = tuple("f16" if t == "f32" else t for t in asked)
    if as_run in compiled:
        return asked

    def key(pair: tuple[str, str]) -> tuple[float, float, bool]:
        loss = sum(max(0.0, _KV_BITS.get(a, 16.0) - _KV_BITS.get(p, 16.0)) for a, p in zip(asked, pair, strict=True))
        size = sum(_KV_BITS.get(p, 16.0) for p in pair)
        return (loss, size, pair != ("f16", "f16"))  # ties: f16 over bf16 (every GPU runs it)

    return min(compiled, key=key)
