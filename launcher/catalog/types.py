"""What a catalog source returns: one Candidate per quantization of a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.gguf import GGUFHeader


@dataclass(frozen=True)
class CandidateFile:
    """One file of a candidate (a shard, or the whole GGUF): where it is and what it must hash to."""

    name: str  # path inside the repository, blob digest, or local file name
    size_bytes: int
    url: str | None = None  # http(s) URL to range-read or download it (no credentials in it)
    local_path: str | None = None  # set when the file is on this machine
    sha256: str | None = None  # published content hash (HF LFS oid, Ollama blob digest without "sha256:")


@dataclass(frozen=True)
class Candidate:
    """One quantization of a model, with its files and parsed GGUF header (header only: no weights)."""

    model: str  # the model reference as the user gave it
    source: str  # "huggingface" | "ollama" | "local" | "ollama-local"
    quant: str  # normalised label: Q4_K_M, UD-Q4_K_XL, IQ4_XS, Q8_0, BF16, F16, MXFP4_MOE, ...
    files: tuple[CandidateFile, ...]  # every shard (or part of a raw split), in order
    header: GGUFHeader | None = None  # None only when the header could not be read (see notes)
    projector: CandidateFile | None = None  # vision companion (mmproj), not a quant of its own
    ollama_model: str | None = None  # how Ollama names it: "qwen3:14b-q4_K_M" or "hf.co/user/repo:Q4_K_M"
    notes: tuple[str, ...] = field(default_factory=tuple)
    # True: `files` are a raw byte split (x.gguf.part1of2, ...), one GGUF cut into pieces that are joined into one
    # file before use; False: one GGUF file, or gguf-split shards (each a GGUF, loaded from shard 1)
    raw_split: bool = False
    # set when the user chose this very file (why, for the plan's note: "you named it"): the quality floor chooses
    # among quants, it does not overrule an explicit choice (launcher.plan runs it below the floor, with a note)
    explicit: str | None = None

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def content_hash(self) -> str | None:
        return self.files[0].sha256 if self.files else None

    @property
    def bits_per_weight(self) -> float | None:
        """Measured from the header: tensor bits over parameters."""
        if self.header is None or not self.header.n_params:
            return None
        return self.header.tensor_bytes_total * 8 / self.header.n_params
