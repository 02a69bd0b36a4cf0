"""`tinygpt laser` and `tinygpt hqq`: weight surgery on a .tinygpt file, written to a new file.

    tinygpt laser model.tinygpt --target mlp.fc_out --layers 8-11 --rank-fraction 0.7 [--factored] --out m2.tinygpt
    tinygpt hqq model.tinygpt --bits 4 --group-size 64 --p 0.7 --layers 0-11 [--targets mlp attn] [--packed] \
        --out m4.tinygpt

Every argument is validated before anything is written; the output is written atomically (the input is
only replaced when --out names it).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _targets(values: list[str] | None) -> list[str] | None:
    """`--targets mlp attn.q_proj` and `--targets mlp,attn.q_proj` both work."""
    if values is None:
        return None
    return [t for v in values for t in v.split(",") if t.strip()] or values


_TARGET_HELP = (
    "mlp.fc_in, mlp.fc_out, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, or mlp/attn/all; on MoE models "
    "mlp.* means every expert's matrix, and moe.experts.J.fc_in / moe.experts.J.fc_out names expert J"
)


def add_parsers(sub) -> None:
    """Register the `laser` and `hqq` subcommands on an argparse subparsers object."""
    p = sub.add_parser("laser", help="LASER: replace weight matrices by low-rank approximations (new file)")
    p.add_argument("file", help="input .tinygpt")
    p.add_argument(
        "--target",
        "--targets",
        dest="targets",
        nargs="+",
        required=True,
        help=_TARGET_HELP,
    )
    p.add_argument("--layers", default=None, help="e.g. 8-11, 0,2,5 or all (default all)")
    p.add_argument("--rank-fraction", type=float, required=True, help="ρ in (0, 1]: fraction of the rank kept")
    p.add_argument("--factored", action="store_true", help="store two factors (fewer parameters, smaller file)")
    p.add_argument("--out", required=True, help="output .tinygpt")

    p = sub.add_parser("hqq", help="quantize weight matrices with HQQ or round-to-nearest (new file)")
    p.add_argument("file", help="input .tinygpt")
    p.add_argument("--bits", type=int, default=4, help="1..8 (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="weights per scale/zero; must divide in_features")
    p.add_argument("--p", type=float, default=0.7, help="HQQ l_p exponent (default 0.7)")
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--kappa", type=float, default=1.01)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rtn", action="store_true", help="plain round-to-nearest, no HQQ optimisation")
    p.add_argument("--layers", default=None, help="e.g. 0-11, 0,2,5 or all (default all)")
    p.add_argument(
        "--target", "--targets", dest="targets", nargs="+", default=None, help=_TARGET_HELP + " (default: all)"
    )
    p.add_argument("--packed", action="store_true", help="store bit-packed codes (file really shrinks)")
    p.add_argument("--out", required=True, help="output .tinygpt")


def _check_out(a: argparse.Namespace) -> Path:
    out = Path(a.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path such as {out / 'model.tinygpt'}")
    return out


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


def cmd_laser(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load, save
    from tinygpt.surgery.laser import _check_fraction, laser_

    out = _check_out(a)
    _check_fraction(a.rank_fraction)
    model = load(a.file)
    report = laser_(model, _targets(a.targets), a.layers, a.rank_fraction, factored=a.factored)
    save(model, out)
    print(report)
    print(f"input  {a.file}: {_size(Path(a.file))}")
    print(f"wrote  {out}: {_size(out)}")
    return 0


def cmd_hqq(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load, save
    from tinygpt.surgery.hqq import check_bits, check_hqq_params, hqq_

    out = _check_out(a)
    check_bits(a.bits)
    check_hqq_params(a.p, a.beta, a.kappa, a.iters)
    model = load(a.file)
    report = hqq_(
        model,
        a.bits,
        a.group_size,
        _targets(a.targets),
        a.layers,
        p=a.p,
        beta=a.beta,
        kappa=a.kappa,
        iters=a.iters,
        optimize=not a.rtn,
        packed=a.packed,
    )
    save(model, out)
    print(report)
    print(f"input  {a.file}: {_size(Path(a.file))}")
    print(f"wrote  {out}: {_size(out)}")
    return 0


COMMANDS = {"laser": cmd_laser, "hqq": cmd_hqq}
