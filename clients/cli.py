"""``deltavault``: the command line over the SDK.

    deltavault serve --root DIR [--store-port P] [--compressor-port Q] [--metrics-port M]
    deltavault compress BASE FINETUNED --ref NAME --method M --ratio R [--json]
    deltavault reconstruct NAME (--base BASE | --base-ref REF) --out DIR
    deltavault register-base BASE --ref REF
    deltavault plan BASE FINETUNED [--methods ...] [--ratios ...]
    deltavault ls [PREFIX] | rm NAME | gc [--dry-run] | verify [NAME] [--trusted-keys DIR]
    deltavault keys generate|new-kek|init|rotate|sign ...

Client subcommands take ``--store HOST:PORT`` and ``--compressor HOST:PORT`` (or env
DELTAVAULT_STORE / DELTAVAULT_COMPRESSOR); ``--json`` prints one JSON document on stdout.
Progress goes to stderr. Trust flags (each also from its env variable): ``--kek FILE``
opens sealed manifests and with ``--keyring FILE`` seals what is written;
``--signing-key FILE`` signs what is committed; ``--trusted-keys DIR`` refuses manifests
not signed by one of its keys.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from clients.errors import DeltaVaultError
from clients.key_files import read_key_file, write_key_file
from clients.safetensors_io import CheckpointError
from clients.sdk import CompressReport, DeltaVault, ModelPair, TensorReport
from clients.sealing import (
    SealingKeys,
    kek_id,
    load_keyring,
    new_keyring,
    rewrap,
    save_keyring,
)
from store_svc.signatures import Signer, TrustedKeys, generate_key_pair

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
"""Bad arguments or input the service rejected (INVALID_ARGUMENT)."""
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
"""The ref exists (pass --force) or moved under a compare-and-swap."""
EXIT_UNAVAILABLE = 5
EXIT_DAMAGED = 6
"""Data loss: a chunk failed its digest (verify found damage)."""
EXIT_PRECONDITION = 7
EXIT_REFUSED = 8
"""No valid token, a role or tenant that may not do this, or over a quota or limit."""

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.ABORTED: EXIT_CONFLICT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: EXIT_DAMAGED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_REFUSED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_REFUSED,
}

EPILOG = """exit codes: 0 ok, 1 failed, 2 bad arguments or input, 3 not found,
4 ref conflict, 5 service unavailable, 6 damaged data, 7 failed precondition,
8 refused (token, role, tenant, quota or limit)"""


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2) if args.json else text())


# --- client subcommands --------------------------------------------------------------


def _vault(args: argparse.Namespace) -> DeltaVault:
    keks = args.kek or _env_list("DELTAVAULT_KEK_FILE")
    keyring = args.keyring or os.environ.get("DELTAVAULT_KEYRING")
    signing_key = args.signing_key or os.environ.get("DELTAVAULT_SIGNING_KEY")
    trusted = args.trusted_keys or os.environ.get("DELTAVAULT_TRUSTED_KEYS")
    if keyring and not keks:
        raise ValueError("--keyring needs the --kek that opens it")
    return DeltaVault(
        args.store,
        args.compressor,
        sealing=SealingKeys.from_files(keks, keyring) if keks else None,
        signer=Signer.from_file(signing_key) if signing_key else None,
        trusted_keys=TrustedKeys.load(trusted) if trusted else None,
    )


def _env_list(name: str) -> list[str]:
    """A comma-separated list of paths from the environment (empty when unset)."""
    return [item for item in os.environ.get(name, "").split(",") if item]


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values parsed as JSON when they parse, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--option {pair!r} must be KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


@contextmanager
def tensor_progress(
    sizes: Mapping[str, int], *, quiet: bool = False, desc: str = ""
) -> Iterator[Callable[[TensorReport], None]]:
    """A bytes progress bar on stderr (hidden when quiet or not a terminal), advanced per
    finished tensor by the bytes it took on the wire."""
    with tqdm(
        total=sum(sizes.values()),
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=True if quiet else None,
        file=sys.stderr,
    ) as bar:

        def advance(report: TensorReport) -> None:
            bar.set_postfix_str(report.name[-40:], refresh=False)
            bar.update(sizes.get(report.name, 0))

        yield advance


def cmd_compress(args: argparse.Namespace) -> int:
    sizes = ModelPair.open(args.base, args.finetuned, None).sizes()
    with _vault(args) as vault, tensor_progress(sizes, quiet=args.quiet) as progress:
        report = vault.compress(
            args.base,
            args.finetuned,
            ref=args.ref,
            method=args.method,
            ratio=args.ratio,
            calibration=args.calibration,
            allocation=args.allocation,
            lossy=args.lossy,
            options=_options(args.option),
            force=args.force,
            progress=progress,
        )
    _emit(args, report.to_json(), lambda: _compress_text(report))
    return EXIT_OK


def _compress_text(report: CompressReport) -> str:
    lossy = [t for t in report.tensors if t.kind == "compressed"]
    lines = [
        f"{report.ref or '(no ref)'} -> {report.manifest}",
        f"tensors: {report.tensor_count} ({len(lossy)} compressed lossy)",
        f"ratio of the compressed tensors: {report.lossy_ratio:.2f}x; whole delta: "
        f"{report.ratio:.2f}x",
        f"bytes stored: {report.bytes_stored:,} ({report.new_chunk_bytes:,} new)",
        f"took {report.seconds:.1f} s",
    ]
    return "\n".join(lines)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    with _vault(args) as vault, _tensor_bar(args.quiet) as advance:
        out = vault.reconstruct(
            args.ref, args.base, args.out, base_ref=args.base_ref, progress=advance
        )
    _emit(args, {"ref": args.ref, "out": str(out)}, lambda: f"wrote {out}")
    return EXIT_OK


def cmd_register_base(args: argparse.Namespace) -> int:
    with _vault(args) as vault, _tensor_bar(args.quiet) as advance:
        report = vault.register_base(args.base, ref=args.ref, force=args.force, progress=advance)
    _emit(
        args,
        asdict(report),
        lambda: (
            f"registered {report.ref} -> {report.manifest}: {report.tensor_count} tensors, "
            f"{report.bytes_stored:,} bytes ({report.new_chunk_bytes:,} new)"
        ),
    )
    return EXIT_OK


@contextmanager
def _tensor_bar(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A tensor-count progress bar on stderr; yields the per-tensor callback."""
    with tqdm(unit="tensor", disable=True if quiet else None, file=sys.stderr) as bar:

        def advance(name: str) -> None:
            bar.set_postfix_str(name[-40:], refresh=False)
            bar.update()

        yield advance


def cmd_plan(args: argparse.Namespace) -> int:
    with _vault(args) as vault:
        rows = list(
            vault.plan(
                args.base,
                args.finetuned,
                methods=args.methods,
                ratios=args.ratios,
                calibration=args.calibration,
                lossy=args.lossy,
                options=_options(args.option),
            )
        )

    def text() -> str:
        lines = [f"{'tensor':<52}{'method':<10}{'target':>7}{'ratio':>8}{'w.err':>8}{'a.err':>8}"]
        for row in rows:
            for e in row.estimates:
                if e.unavailable:
                    lines.append(
                        f"{row.name[-50:]:<52}{e.method:<10}{e.target_ratio:>7g}  "
                        f"unavailable: {e.unavailable}"
                    )
                    continue
                act = "-" if e.activation_error is None else f"{e.activation_error:.3f}"
                lines.append(
                    f"{row.name[-50:]:<52}{e.method:<10}{e.target_ratio:>7g}{e.ratio:>8.2f}"
                    f"{e.weight_error:>8.3f}{act:>8}"
                )
        return "\n".join(lines)

    _emit(args, [asdict(row) for row in rows], text)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with _vault(args) as vault:
        refs = vault.list(args.prefix)
    _emit(
        args,
        [{"ref": r, "manifest": d} for r, d in refs],
        lambda: "\n".join(f"{r}\t{d}" for r, d in refs),
    )
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    with _vault(args) as vault:
        digest = vault.delete(args.ref)
    _emit(args, {"ref": args.ref, "manifest": digest}, lambda: f"removed {args.ref} ({digest})")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    with _vault(args) as vault:
        report = vault.gc(dry_run=args.dry_run, grace_seconds=args.grace_seconds)
    _emit(args, report, lambda: "\n".join(f"{k}: {v}" for k, v in report.items()))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """The store re-hashes what it holds; with a ref, this client then checks the manifest
    itself (its signature with --trusted-keys) and fetches and checks every chunk."""
    with _vault(args) as vault:
        if vault.trusted_keys is not None and args.ref is None:
            raise ValueError("--trusted-keys checks one manifest: name its ref")
        report = vault.verify(args.ref)
        if args.ref is not None and not report["damaged"]:
            report["client"] = vault.check(args.ref)

    def text() -> str:
        head = f"checked {report['chunks_checked']} chunks, {report['bytes_checked']:,} bytes"
        damage = [f"DAMAGED {d['key']}: {d['problem']}" for d in report["damaged"]]
        lines = [head, *damage] if damage else [head, "no damage"]
        client = report.get("client")
        if client:
            signer = f"signed by {client['signed_by']}" if client["signed_by"] else "unchecked"
            sealed = ""
            if client["sealed"]:
                opened = client["authenticated"]
                sealed = ", sealed: authenticated" if opened else ", sealed: ciphertext only"
            lines.append(
                f"fetched and checked here: {client['chunks']} chunks, {client['bytes']:,} "
                f"bytes{sealed}; signature {signer}"
            )
        return "\n".join(lines)

    _emit(args, report, text)
    return EXIT_DAMAGED if report["damaged"] else EXIT_OK


# --- keys ----------------------------------------------------------------------------


def cmd_keys_generate(args: argparse.Namespace) -> int:
    private, public, key_id = generate_key_pair(args.out, args.name)
    data = {"key_id": key_id, "private": str(private), "public": str(public)}
    _emit(args, data, lambda: f"{key_id}: {private} (keep secret), {public} (share)")
    return EXIT_OK


def cmd_keys_new_kek(args: argparse.Namespace) -> int:
    key = write_key_file(args.file)
    _emit(args, {"kek_id": kek_id(key), "file": str(args.file)}, lambda: kek_id(key))
    return EXIT_OK


def cmd_keys_init(args: argparse.Namespace) -> int:
    record, _ = new_keyring(read_key_file(args.kek))
    save_keyring(args.keyring, record, replace=False)
    data = {"data_key_id": record.data_key_id, "keyring": str(args.keyring)}
    _emit(args, data, lambda: f"{record.data_key_id} -> {args.keyring}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Re-wrap the keyring and every sealed manifest under the prefix for the new KEK."""
    new_kek = read_key_file(args.new_kek)
    with _vault(args) as vault:
        if vault.sealing is None:
            raise ValueError("rotation needs --kek: the KEK the data key is wrapped for now")
        rotated = vault.rotate(new_kek, prefix=args.prefix, keep_old=args.keep_old)
        if args.keyring:
            record = rewrap(
                load_keyring(args.keyring), vault.sealing.keks, new_kek, keep_old=args.keep_old
            )
            save_keyring(args.keyring, record, replace=True)
    rows = [asdict(r) for r in rotated]
    _emit(
        args,
        rows,
        lambda: (
            "\n".join([f"{r.ref}: {r.previous} -> {r.manifest}" for r in rotated])
            or "no sealed manifest under the prefix"
        ),
    )
    return EXIT_OK


def cmd_keys_sign(args: argparse.Namespace) -> int:
    with _vault(args) as vault:
        key_id = vault.sign(args.ref)
    _emit(args, {"ref": args.ref, "key_id": key_id}, lambda: f"{args.ref} signed by {key_id}")
    return EXIT_OK


def _keys_parser(sub: Any) -> list[argparse.ArgumentParser]:
    keys = sub.add_parser("keys", help="signing keys, KEKs, keyrings: create, rotate, sign")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    generate = actions.add_parser("generate", help="a new Ed25519 signing key pair")
    generate.add_argument("--out", type=Path, required=True, help="folder for NAME.key/.pub")
    generate.add_argument("--name", required=True)
    generate.set_defaults(func=cmd_keys_generate)
    kek = actions.add_parser("new-kek", help="a new random key-encryption key file (0600)")
    kek.add_argument("file", type=Path)
    kek.set_defaults(func=cmd_keys_new_kek)
    init = actions.add_parser("init", help="a new data key, wrapped by --kek, as a keyring")
    init.add_argument("--kek", type=Path, required=True)
    init.add_argument("--keyring", type=Path, required=True, help="keyring file to create")
    init.set_defaults(func=cmd_keys_init)
    rotate = actions.add_parser(
        "rotate", help="re-wrap data keys for a new KEK: the keyring and sealed manifests"
    )
    rotate.add_argument("--new-kek", type=Path, required=True)
    rotate.add_argument("--prefix", default="", help="refs to rotate (default: all)")
    rotate.add_argument("--keep-old", action="store_true", help="keep the old KEK's wrappings")
    rotate.set_defaults(func=cmd_keys_rotate)
    sign = actions.add_parser("sign", help="add --signing-key's signature to REF's manifest")
    sign.add_argument("ref")
    sign.set_defaults(func=cmd_keys_sign)
    for p in (generate, kek, init):
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return [rotate, sign]


# --- serve ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from clients.embedded import serve_embedded  # noqa: PLC0415 - servers only for `serve`

    serve_embedded(args)
    return EXIT_OK


# --- parser --------------------------------------------------------------------------


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="store HOST:PORT (env DELTAVAULT_STORE)")
    p.add_argument(
        "--compressor",
        default=None,
        help="compressor HOST:PORT, a comma-separated list, or all:HOST:PORT for every "
        "address of a DNS name (env DELTAVAULT_COMPRESSOR)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--kek",
        type=Path,
        action="append",
        default=[],
        help="key-encryption key file that opens sealed manifests; repeatable "
        "(env DELTAVAULT_KEK_FILE, comma-separated)",
    )
    p.add_argument(
        "--keyring",
        type=Path,
        help="keyring whose data key seals what is written (env DELTAVAULT_KEYRING)",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        help="Ed25519 private key that signs committed manifests (env DELTAVAULT_SIGNING_KEY)",
    )
    p.add_argument(
        "--trusted-keys",
        type=Path,
        help="folder of *.pub keys: refuse manifests not signed by one "
        "(env DELTAVAULT_TRUSTED_KEYS)",
    )


def _input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, help="base model: safetensors directory or file")
    p.add_argument("finetuned", type=Path, help="fine-tuned model, or a PEFT LoRA adapter")
    p.add_argument("--calibration", type=Path, help="Gram matrices file (clients.calibration)")
    p.add_argument(
        "--lossy", action="append", default=[], help="regex of tensors to compress lossy"
    )
    p.add_argument(
        "--option", action="append", default=[], help="method option KEY=VALUE (JSON values)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltavault",
        description="Store fine-tunes as compressed deltas against their base model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the store (local folder) and a compressor")
    from clients.embedded import add_serve_flags  # noqa: PLC0415

    add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)

    compress = sub.add_parser("compress", help="compress FINETUNED against BASE into the store")
    _input_flags(compress)
    compress.add_argument("--ref", required=True, help="ref to point at it: namespace/name")
    compress.add_argument("--method", default="adamix", help="adamix, deltadq, deltacome, ...")
    compress.add_argument("--ratio", type=float, default=16.0, help="target x against fp16")
    compress.add_argument("--allocation", choices=["per-matrix", "model"], default="per-matrix")
    compress.add_argument("--force", action="store_true", help="move the ref if it exists")
    compress.set_defaults(func=cmd_compress)

    reconstruct = sub.add_parser("reconstruct", help="write base + delta as a checkpoint")
    reconstruct.add_argument("ref")
    base = reconstruct.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", type=Path, help="the base checkpoint folder")
    base.add_argument("--base-ref", help="a base registered with register-base")
    reconstruct.add_argument("--out", type=Path, required=True)
    reconstruct.set_defaults(func=cmd_reconstruct)

    register = sub.add_parser(
        "register-base", help="keep a base checkpoint in the store, for reconstruct --base-ref"
    )
    register.add_argument("base", type=Path)
    register.add_argument("--ref", required=True, help="ref to point at it: namespace/name")
    register.add_argument("--force", action="store_true", help="move the ref if it exists")
    register.set_defaults(func=cmd_register_base)

    plan = sub.add_parser("plan", help="dry run: size and error per method and ratio")
    _input_flags(plan)
    plan.add_argument("--methods", nargs="+", default=["adamix", "deltadq"])
    plan.add_argument("--ratios", nargs="+", type=float, default=[8.0, 16.0, 32.0])
    plan.set_defaults(func=cmd_plan)

    ls = sub.add_parser("ls", help="list refs")
    ls.add_argument("prefix", nargs="?", default="")
    ls.set_defaults(func=cmd_ls)

    rm = sub.add_parser("rm", help="delete a ref (its data goes at the next gc)")
    rm.add_argument("ref")
    rm.set_defaults(func=cmd_rm)

    gc = sub.add_parser("gc", help="sweep unreferenced data")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--grace-seconds", type=int, default=None)
    gc.set_defaults(func=cmd_gc)

    verify = sub.add_parser("verify", help="re-hash stored chunks")
    verify.add_argument("ref", nargs="?", default=None)
    verify.set_defaults(func=cmd_verify)

    for p in (compress, reconstruct, register, plan, ls, rm, gc, verify, *_keys_parser(sub)):
        _client_flags(p)
        p.epilog = EPILOG
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DeltaVaultError as exc:
        print(f"deltavault {args.command}: {exc.code.name}: {exc}", file=sys.stderr)
        return _EXIT_BY_CODE.get(exc.code, EXIT_FAILED)
    except (CheckpointError, ValueError) as exc:
        print(f"deltavault {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
