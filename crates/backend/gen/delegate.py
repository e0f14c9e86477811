#!/usr/bin/env python3
"""Generate the mechanical delegation of Burn 0.21's ops traits, one file per
trait (as burn-autodiff splits its ops), for two backends:

- `Mics<I>` (crates/backend/src/ops/{float,int,bool,activation,qtensor,module}.rs):
  every method whose arguments and result are made of float, int, bool and
  quantized primitives, devices and plain values is forwarded to the inner
  backend: float arguments are made local first (`local`, which gathers a
  sharded parameter), float results are wrapped as local tensors. Methods in
  MANUAL are written by hand in `ops/manual.rs` (views and the few ops with
  structured results); METADATA_ONLY arguments are used by the inner op for
  their shape, dtype and device only, so a sharded parameter is replaced by
  a stand-in of its logical shape instead of being gathered; methods that
  cannot be forwarded mechanically keep Burn's default body.
- `Plain<B>` (crates/plain/src/ops/*.rs): every method forwarded unchanged
  to `B`, a pass-through with no logic of its own.

Burn's sources are found through `cargo metadata` (the burn-backend package
the workspace resolves), never a path glob.

Run from anywhere in the workspace:
    python3 crates/backend/gen/delegate.py            # write the files
    python3 crates/backend/gen/delegate.py --check    # fail if they are stale (CI)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
GENERATOR = "crates/backend/gen/delegate.py"

# (source file under burn-backend's src/backend/ops, trait, output file stem)
TRAITS = [
    ("tensor.rs", "FloatTensorOps", "float"),
    ("int_tensor.rs", "IntTensorOps", "int"),
    ("bool_tensor.rs", "BoolTensorOps", "bool"),
    ("activation.rs", "ActivationOps", "activation"),
    ("qtensor.rs", "QTensorOps", "qtensor"),
    ("modules/base.rs", "ModuleOps", "module"),
]

# Mics: written by hand in ops/manual.rs (float_random and int_random:
# per-thread generator, see src/random.rs).
MANUAL = {
    "float_device", "float_to_device", "float_reshape", "float_swap_dims", "float_permute",
    "float_expand", "float_slice", "quantize", "deform_conv2d_backward",
    "float_into_data", "max_pool2d_with_indices", "max_pool2d_with_indices_backward",
    "float_random", "int_random",
}
# Mics: Burn's default body is the right one on a sharded parameter (no data
# touched, or expressed through the lazy views above). `embedding_backward`'s
# default reads only the table's shape, device and dtype (no backend
# overrides it), so a sharded table is never gathered for its gradient.
KEEP_DEFAULT = {
    "float_transpose", "float_detach", "float_set_require_grad", "float_is_require_grad",
    "embedding_backward",
}
# Mics: arguments the inner op reads for their shape, dtype and device only
# (the gradient of a weight does not depend on the weight's values): a
# sharded parameter is passed as an uninitialised stand-in of its logical
# shape (`manual::stand_in`), never gathered.
METADATA_ONLY = {
    f"conv{t}{d}d_{w}_backward": w
    for t in ("", "_transpose")
    for d in (1, 2, 3)
    for w in ("weight", "bias")
}

PASS = re.compile(r"^&?(mut )?(IntTensor|BoolTensor|QuantizedTensor|Device)<Self>$")


def burn_ops_dir():
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    for package in json.loads(out)["packages"]:
        if package["name"] == "burn-backend":
            src = os.path.dirname(package["manifest_path"])
            return os.path.join(src, "src", "backend", "ops"), package["version"]
    sys.exit("delegate.py: cargo metadata lists no burn-backend package")


def signatures(text):
    for m in re.finditer(r"\n    fn (\w+)", text):
        k, depth = m.end(), 0
        while True:
            c = text[k]
            if c in "([<":
                depth += 1
            elif c in ")]>" and not (c == ">" and text[k - 1] == "-"):
                depth -= 1
            elif depth == 0 and c in ";{":
                break
            k += 1
        yield m.group(1), text[m.start() + 5 : k].strip(), c == ";"


def split_top(s):
    parts, depth, cur = [], 0, ""
    for i, c in enumerate(s):
        if c in "([<":
            depth += 1
        elif c in ")]>" and not (c == ">" and s[i - 1] == "-"):
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        parts.append(cur.strip())
    return parts


def arg_expr(name, ty, metadata_only):
    ty = ty.replace(" ", "")
    if ty == "FloatTensor<Self>":
        return f"manual::stand_in({name})" if metadata_only else f"local({name})"
    if ty == "Option<FloatTensor<Self>>":
        return f"{name}.map(local)"
    if ty == "Vec<FloatTensor<Self>>":
        return f"{name}.into_iter().map(local).collect()"
    if "Self" not in ty or PASS.match(ty) or re.match(r"^(Vec|Option)<(IntTensor|BoolTensor)<Self>>$", ty):
        return name
    return None


def ret_expr(ty):
    t = ty.replace(" ", "")
    if t == "" or "FloatTensor" not in t and ("Self" not in t or "implFuture" in t):
        return "out"
    if t == "FloatTensor<Self>":
        return "MicsTensor::Local(out)"
    if t == "Option<FloatTensor<Self>>":
        return "out.map(MicsTensor::Local)"
    if t == "Vec<FloatTensor<Self>>":
        return "out.into_iter().map(MicsTensor::Local).collect()"
    if PASS.match(t):
        return "out"
    if t.startswith("(") and t.endswith(")"):
        items = []
        for i, el in enumerate(split_top(t[1:-1])):
            if el == "FloatTensor<Self>":
                items.append(f"MicsTensor::Local(out.{i})")
            elif PASS.match(el):
                items.append(f"out.{i}")
            else:
                return None
        return "(" + ", ".join(items) + ")"
    return None


def trait_body(ops_dir, path, trait):
    text = open(os.path.join(ops_dir, path)).read()
    start = text.index(f"pub trait {trait}")
    depth, end = 0, text.index("{", start)
    for end in range(end, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    return text[start:end]


def parse(sig):
    """(signature with `Self`, generics, argument list, return type)."""
    sig = re.sub(r"\bB\b", "Self", sig).replace("crate::tensor::", "")
    sig = re.sub(r"\b_(\w+):", r"\1:", sig)
    open_at = sig.index("(")
    depth, close_at = 0, open_at
    for close_at in range(open_at, len(sig)):
        depth += {"(": 1, ")": -1}.get(sig[close_at], 0)
        if depth == 0:
            break
    generics = "<" in sig[:open_at]
    args = split_top(sig[open_at + 1 : close_at])
    ret = sig[close_at + 1 :].strip().removeprefix("->").strip()
    return sig, generics, args, ret


def one_line(sig):
    line = re.sub(r"\s+", " ", sig)
    line = re.sub(r"\bmut (\w+):", r"\1:", line)
    return line.replace("( ", "(").replace(", )", ")")


def header(version, what):
    return [
        f"// @generated by {GENERATOR} from burn-backend {version}: do not edit.",
        f"//! {what}",
        "",
        "use super::prelude::*;",
        "",
    ]


def mics_file(ops_dir, version, path, trait):
    out = header(version, f"`{trait}` for `Mics<I>`: forwarded to the inner backend.")
    skipped = []
    body = trait_body(ops_dir, path, trait)
    out.append(f"impl<I: Backend> {trait}<Self> for Mics<I> {{")
    for name, raw, required in signatures(body):
        if name in KEEP_DEFAULT:
            continue
        sig, generics, args, ret = parse(raw)
        if name in MANUAL:
            names = ", ".join(a.split(":")[0].strip() for a in args)
            out.append(f"    {one_line(sig)} {{")
            out.append(f"        manual::{name}::<I>({names})")
            out.append("    }")
            continue
        ok = not generics and ("impl Future" not in ret or "FloatTensor" not in sig)
        exprs = []
        for a in args:
            if not ok:
                break
            if a in ("&self", "self") or ":" not in a:
                ok = False
                break
            n, t = a.split(":", 1)
            n = n.strip().removeprefix("mut ")
            e = arg_expr(n, t.strip(), METADATA_ONLY.get(name) == n)
            if e is None:
                ok = False
            exprs.append(e)
        r = ret_expr(ret) if ok else None
        if r is None:
            if required:
                skipped.append(f"{trait}::{name}")
            continue
        gathers = any(e.startswith("local(") or ".map(local)" in e for e in exprs)
        call = f"I::{name}({', '.join(exprs)})"
        out.append(f"    {one_line(sig)} {{")
        if r == "out" and not gathers:
            out.append(f"        {call}")
        else:
            out.append(f"        let out = {call};")
            if gathers:
                out.append("        release_gathered();")
            out.append(f"        {r}")
        out.append("    }")
    out.append("}")
    if skipped:
        sys.exit("required methods neither generated nor in MANUAL: " + ", ".join(skipped))
    return "\n".join(out) + "\n"


# Plain: results and arguments that are structs over the backend type, whose
# fields are the same primitives: converted field by field (crates/plain/src/convert.rs).
PLAIN_RESULTS = {
    "DeformConv2dBackward<Self>": "deform_conv2d_backward",
    "MaxPool1dWithIndices<Self>": "max_pool1d_with_indices",
    "MaxPool1dBackward<Self>": "max_pool1d_backward",
    "MaxPool2dWithIndices<Self>": "max_pool2d_with_indices",
    "MaxPool2dBackward<Self>": "max_pool2d_backward",
    "TensorPrimitive<Self>": "tensor_primitive",
}
PLAIN_ARGS = {
    "QuantizationParametersPrimitive<Self>": "qparams",
    "TensorPrimitive<Self>": "tensor_primitive_in",
}


def plain_file(ops_dir, version, path, trait):
    out = header(version, f"`{trait}` for `Plain<B>`: every method forwarded to `B` unchanged.")
    body = trait_body(ops_dir, path, trait)
    out.append(f"impl<B: Backend> {trait}<Self> for Plain<B> {{")
    for name, raw, _required in signatures(body):
        sig, generics, args, ret = parse(raw)
        if generics or any(a in ("&self", "self") for a in args):
            sys.exit(f"delegate.py: {trait}::{name} has generics or a receiver: forward it by hand")
        exprs = []
        for a in args:
            n, t = a.split(":", 1)
            n = n.strip().removeprefix("mut ")
            convert = PLAIN_ARGS.get(t.replace(" ", ""))
            exprs.append(f"convert::{convert}({n})" if convert else n)
        call = f"B::{name}({', '.join(exprs)})"
        convert = PLAIN_RESULTS.get(ret.replace(" ", ""))
        out.append(f"    {one_line(sig)} {{")
        out.append(f"        convert::{convert}({call})" if convert else f"        {call}")
        out.append("    }")
    out.append("}")
    return "\n".join(out) + "\n"


def outputs():
    ops_dir, version = burn_ops_dir()
    files = {}
    for path, trait, stem in TRAITS:
        files[f"crates/backend/src/ops/{stem}.rs"] = mics_file(ops_dir, version, path, trait)
        files[f"crates/plain/src/ops/{stem}.rs"] = plain_file(ops_dir, version, path, trait)
    return files


def rustfmt(paths):
    subprocess.run(["rustfmt", "--edition", "2024", *paths], check=True)


def main():
    check = "--check" in sys.argv[1:]
    files = outputs()
    if not check:
        for rel, text in files.items():
            with open(os.path.join(ROOT, rel), "w") as f:
                f.write(text)
        rustfmt([os.path.join(ROOT, rel) for rel in files])
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for rel, text in files.items():
            path = os.path.join(tmp, rel.replace("/", "__"))
            with open(path, "w") as f:
                f.write(text)
            paths[rel] = path
        rustfmt(list(paths.values()))
        stale = []
        for rel, path in paths.items():
            committed = os.path.join(ROOT, rel)
            fresh = open(path).read()
            if not os.path.exists(committed) or open(committed).read() != fresh:
                stale.append(rel)
        if stale:
            sys.exit(
                "delegate.py --check: generated files are stale: " + ", ".join(stale)
                + f"\nregenerate with: python3 {GENERATOR}"
            )
        print(f"delegate.py --check: {len(paths)} generated files up to date")


if __name__ == "__main__":
    main()
