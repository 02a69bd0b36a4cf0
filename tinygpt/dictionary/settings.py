"""`train_sae`'s settings: checks, the dictionaries they define, output paths, the corpus record, resume state.

`SETTINGS` names every setting saved in a run's `.sae` files (`training.settings`); `resume=True` rebuilds the
run from them.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from tinygpt.checkpoint import OutputError
from tinygpt.data import Corpus
from tinygpt.dictionary.activations import check_hooks
from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.files import read_sae_file
from tinygpt.dictionary.modules import ARCHS, DictionaryConfig
from tinygpt.io import check_output

DEFAULT_TOKENS = 2_000_000
B_DEC_INITS = ("geometric_median", "mean", "zeros")
SETTINGS = (
    "hook",
    "out_hook",
    "transcoder",
    "skip",
    "arch",
    "k",
    "expansion",
    "d_sae",
    "tokens",
    "batch_size",
    "context",
    "lr",
    "warmup",
    "decay",
    "l1_coef",
    "l0_coef",
    "jumprelu_threshold",
    "bandwidth",
    "sparsity_warmup",
    "aux_coef",
    "aux_k",
    "dead_after",
    "threshold_lr",
    "b_dec_init",
    "normalize",
    "buffer_tokens",
    "model_batch",
    "val_split",
    "seed",
)


def _listed(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _sites(hooks: list[str], out_hook: Any, transcoder: bool) -> list[tuple[str, str | None]]:
    if out_hook is not None:
        outs = _listed(out_hook)
        if len(outs) == 1:
            outs = outs * len(hooks)
        if len(outs) != len(hooks):
            raise DictionaryError(f"give one out_hook per hook: {len(hooks)} hooks, {len(outs)} out_hooks")
        return list(zip(hooks, outs))
    if not transcoder:
        return [(h, None) for h in hooks]
    pairs = []
    for h in hooks:
        m = re.match(r"blocks\.(\d+)\.", str(h))
        if not m:
            raise DictionaryError(f"transcoder=True takes the layer from the hook name (blocks.L....), got {h!r}")
        pairs.append((f"blocks.{m[1]}.ln2.hook_normalized", f"blocks.{m[1]}.hook_mlp_out"))
    return pairs


def check_settings(s: dict[str, Any]) -> None:
    def positive(name: str, v: Any, integer: bool = True) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (not integer or isinstance(v, int))
        if not ok:
            raise DictionaryError(f"{name} must be a positive {'integer' if integer else 'number'}, got {v!r}")

    for a in _listed(s["arch"]):
        if a not in ARCHS:
            raise DictionaryError(f"unknown dictionary architecture {a!r}; choose one of {', '.join(ARCHS)}")
    if s["d_sae"] is None:
        for e in _listed(s["expansion"]):
            positive("expansion", e, integer=False)
    for name in ("tokens", "batch_size", "buffer_tokens", "model_batch", "dead_after"):
        positive(name, s[name])
    if s["context"] is not None:
        positive("context", s["context"])
    for name in ("lr", "aux_k"):
        if s[name] is not None:
            positive(name, s[name], integer=name == "aux_k")
    for name in ("l1_coef", "l0_coef", "aux_coef", "threshold_lr"):
        if not isinstance(s[name], (int, float)) or s[name] < 0:
            raise DictionaryError(f"{name} must be a number >= 0, got {s[name]!r}")
    if s["tokens"] < s["batch_size"]:
        raise DictionaryError(f"tokens={s['tokens']} is less than one batch of {s['batch_size']}")
    if s["b_dec_init"] not in B_DEC_INITS:
        raise DictionaryError(f"b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {s['b_dec_init']!r}")
    if not 0.0 <= s["val_split"] < 1.0:
        raise DictionaryError(f"val_split must be in [0, 1), got {s['val_split']}")


def configs(model, s: dict[str, Any]) -> list[DictionaryConfig]:
    sites = _sites(_listed(s["hook"]), s["out_hook"], s["transcoder"])
    widths = check_hooks(model, [h for pair in sites for h in pair if h is not None])
    cfgs = []
    sizes = _listed(s["d_sae"]) if s["d_sae"] is not None else _listed(s["expansion"])
    ks = _listed(s["k"])
    for (h, o), arch, size, k in itertools.product(sites, _listed(s["arch"]), sizes, ks):
        if arch == "relu" and k != ks[0]:
            continue  # k does not change a ReLU dictionary: one per site and size
        d_in = widths[h]
        d_sae = size if s["d_sae"] is not None else int(round(size * d_in))
        cfgs.append(
            DictionaryConfig(
                arch=arch,
                d_in=d_in,
                d_sae=d_sae,
                hook=h,
                out_hook=o,
                d_out=widths[o] if o else None,
                k=k if arch != "relu" else None,  # jumprelu: the L0 its thresholds start at
                skip=bool(s["skip"]) and o is not None,
                bandwidth=s["bandwidth"],
            )
        )
        if s["skip"] and o is None:
            raise DictionaryError("skip=True is a transcoder option: give transcoder=True or out_hook=")
    return cfgs


def _file_name(c: DictionaryConfig) -> str:
    site = f"{c.hook}-to-{c.out_hook}" if c.transcoder else c.hook
    return f"{site}-{c.arch}-{c.d_sae}" + (f"-k{c.k}" if c.k is not None else "") + ".sae"


def out_paths(out: Any, cfgs: list[DictionaryConfig]) -> list[Path]:
    if out is None:
        return []
    out = Path(out)
    if len(cfgs) == 1 and (out.suffix == ".sae" or (out.exists() and not out.is_dir())):
        return [out]
    if out.exists() and not out.is_dir():
        raise DictionaryError(f"{len(cfgs)} dictionaries go into a directory, but {out} is a file")
    return [out / _file_name(c) for c in cfgs]


def check_outputs(paths: list[Path], sources: list[Any], *, overwrite: bool, resume: bool) -> None:
    """The preflight of a run's files: none is an input (`sources`: the model path, the corpus), an existing
    one is replaced only with `overwrite` (or continued with `resume`), each location is writable. Raises
    `OutputError` before anything runs."""
    inputs: list[str] = []
    for src in sources:
        if isinstance(src, (str, Path)):
            inputs.append(str(src))
        elif isinstance(src, Corpus):
            inputs += [str(f) for f in src.files]
    hint = "pass overwrite=True (--overwrite) to replace it with a new run, or resume=True (--resume) to continue it"
    for p in paths:
        check_output(p, overwrite=overwrite or resume, inputs=inputs, error=OutputError, hint=hint)


def corpus_record(corpus: Any) -> Any:
    if corpus is None or isinstance(corpus, str):
        return corpus
    if isinstance(corpus, Corpus):
        return {
            "name": corpus.name,
            "files": [str(f) for f in corpus.files],
            "kind": corpus.kind,
            "text_field": corpus.text_field,
        }
    if isinstance(corpus, Path):
        return str(corpus)
    return {"token_ids": True}


def corpus_from_record(rec: Any) -> Any:
    if isinstance(rec, dict) and rec.get("token_ids"):
        raise DictionaryError("this run trained on token ids passed in memory: pass them again as corpus= to resume")
    if isinstance(rec, dict):
        return Corpus(
            name=rec["name"], files=[Path(f) for f in rec["files"]], kind=rec["kind"], text_field=rec["text_field"]
        )
    return rec


def resume_state(out: Any) -> tuple[list[Path], list[tuple[dict, dict]]]:
    if out is None:
        raise DictionaryError("resume=True needs out= (the .sae file or directory of the run to continue)")
    out = Path(out)
    if not out.exists():
        raise DictionaryError(f"nothing to resume: {out} does not exist")
    first = out if out.is_file() else next(iter(sorted(out.glob("*.sae"))), None)
    if first is None:
        raise DictionaryError(f"nothing to resume: {out} holds no .sae files")
    group = (read_sae_file(first)[0].get("training") or {}).get("group") or [first.name]
    paths = [first.parent / name for name in group]
    files = [read_sae_file(p) for p in paths]
    steps = {(m.get("training") or {}).get("step") for m, _ in files}
    if len(steps) != 1 or any("optimizer" not in (m.get("training") or {}) for m, _ in files):
        raise DictionaryError(f"{out}: the files of this run hold no common training state to resume from")
    return paths, files


__all__ = [
    "B_DEC_INITS",
    "DEFAULT_TOKENS",
    "SETTINGS",
    "check_outputs",
    "check_settings",
    "configs",
    "corpus_from_record",
    "corpus_record",
    "out_paths",
    "resume_state",
]
