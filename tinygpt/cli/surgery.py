"""`tinygpt laser` and `tinygpt hqq`: weight surgery on a .tinygpt file, written to a new file.

    tinygpt laser model.tinygpt --target mlp.fc_out --layers 8-11 --rank-fraction 0.7 [--factored] --out m2.tinygpt
    tinygpt hqq model.tinygpt --bits 4 --group-size 64 --p 0.7 --layers 0-11 [--targets mlp attn] [--packed] \
        --out m4.tinygpt

Every argument is validated before anything is written (the library functions check theirs before they change
the model); the output is written atomically (the input is only replaced when --out names it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygpt.cli._command import command, file_size, out_file
from tinygpt.cli._flags import add

_TARGET_HELP = (
    "attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.fc_in, mlp.fc_out, mlp.gate_proj, mlp.up_proj, "
    "mlp.down_proj (or the leaf names), or mlp/attn/all/experts; on MoE models mlp.* means every expert's matrix, "
    "and moe.experts.J.<leaf> names expert J"
)


def _targets(values: list[str] | None) -> list[str] | None:
    """`--targets mlp attn.q_proj` and `--targets mlp,attn.q_proj` both work."""
    if values is None:
        return None
    return [t for v in values for t in v.split(",") if t.strip()] or values


def _common_flags(p: argparse.ArgumentParser, *, required: bool, targets_help: str, layers: str) -> None:
    p.add_argument("file", help="input .tinygpt")
    p.add_argument("--target", "--targets", dest="targets", nargs="+", required=required, help=targets_help)
    add(p, "--layers", help=f"e.g. {layers}, 0,2,5 or all (default all)")


def _laser_flags(p: argparse.ArgumentParser) -> None:
    _common_flags(p, required=True, targets_help=_TARGET_HELP, layers="8-11")
    p.add_argument("--rank-fraction", type=float, required=True, help="ρ in (0, 1]: fraction of the rank kept")
    p.add_argument("--factored", action="store_true", help="store two factors (fewer parameters, smaller file)")
    add(p, "--out", help="output .tinygpt")
    add(p, "--overwrite", help="replace an existing --out (also the input file itself)")


def _hqq_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, help="1..8 (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="weights per scale/zero; must divide in_features")
    p.add_argument("--p", type=float, default=0.7, help="HQQ l_p exponent (default 0.7)")
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--kappa", type=float, default=1.01)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rtn", action="store_true", help="plain round-to-nearest, no HQQ optimisation")
    _common_flags(p, required=False, targets_help=_TARGET_HELP + " (default: all)", layers="0-11")
    p.add_argument("--packed", action="store_true", help="store bit-packed codes (file really shrinks)")
    add(p, "--out", help="output .tinygpt")
    add(p, "--overwrite", help="replace an existing --out (also the input file itself)")


def _operate(a: argparse.Namespace, operation) -> int:
    """Load --file, apply `operation(model)` (returns the report), save to --out, print the report and sizes."""
    from tinygpt.checkpoint import load, resumable_state, save

    out = out_file(a.out)  # checked before: writable, not the input unless --overwrite (tinygpt.cli._preflight)
    lost = resumable_state(a.file)
    size_in = file_size(Path(a.file))  # before: --out may name the input (--overwrite)
    model = load(a.file)
    report = operation(model)
    save(model, out)
    print(report)
    if lost:
        print(f"warning: {a.file} is {lost}; {out} holds the weights only (no optimizer state, not resumable)")
    print(f"input  {a.file}: {size_in}")
    print(f"wrote  {out}: {file_size(out)}")
    return 0


@command("laser", "LASER: replace weight matrices by low-rank approximations (new file)", flags=_laser_flags)
def cmd_laser(a: argparse.Namespace) -> int:
    from tinygpt.surgery import laser_

    return _operate(
        a,
        lambda model: laser_(
            model, _targets(a.targets), layers=a.layers, rank_fraction=a.rank_fraction, factored=a.factored
        ),
    )


@command("hqq", "quantize weight matrices with HQQ or round-to-nearest (new file)", flags=_hqq_flags)
def cmd_hqq(a: argparse.Namespace) -> int:
    from tinygpt.surgery import hqq_

    return _operate(
        a,
        lambda model: hqq_(
            model,
            bits=a.bits,
            group_size=a.group_size,
            targets=_targets(a.targets),
            layers=a.layers,
            p=a.p,
            beta=a.beta,
            kappa=a.kappa,
            iters=a.iters,
            optimize=not a.rtn,
            packed=a.packed,
        ),
    )
