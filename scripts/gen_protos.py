"""Generate the Python stubs in clients/python/pigeon/v1/ from protos/pigeon/v1/ (`make gen`).

With --check, generate into a temporary folder and fail if the committed stubs differ, so a proto
change without `make gen` cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import google.api
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "clients" / "python" / "pigeon" / "v1"
# Hand-written files that live beside the generated ones.
BIN = Path(sys.executable).parent
KEEP = {"__init__.py", "py.typed"}


def generate(out_root: Path) -> None:
    """Run protoc so that protos/pigeon/v1/x.proto becomes <out_root>/pigeon/v1/x_pb2.py."""
    google_root = Path(next(iter(google.api.__path__))).parent.parent
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "pigeon" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{google_root}",
        f"-I{well_known}",
        # The mypy-protobuf plugins sit beside this interpreter, which need not be on PATH.
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        # The stubs carry no comments; the REST layer's OpenAPI document reads them from here.
        f"--descriptor_set_out={out_root / 'pigeon' / 'v1' / 'descriptors.binpb'}",
        "--include_source_info",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generated_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.name not in KEEP}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if pigeon/v1 is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "pigeon" / "v1"
        if args.check:
            names = generated_files(fresh)
            committed = generated_files(OUT)
            _, mismatch, errors = filecmp.cmpfiles(fresh, OUT, sorted(names), shallow=False)
            stale = sorted(set(mismatch) | set(errors) | (committed ^ names))
            if stale:
                print("generated stubs differ from protos/ (run `make gen`):", ", ".join(stale))
                return 1
            print("generated stubs match protos/")
            return 0
        for old in generated_files(OUT):
            (OUT / old).unlink()
        for name in generated_files(fresh):
            shutil.copy2(fresh / name, OUT / name)
    print(f"generated {len(generated_files(OUT))} files in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
