"""Build hook of voicemesh-protos: the Python stubs are generated from the .proto files by the
build itself (wheel, sdist or editable install), never committed or edited by hand."""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "voicemesh" / "v1"


def generate_stubs() -> None:
    """protoc (from grpcio-tools, a build requirement) writes *_pb2.py, *_pb2.pyi and
    *_pb2_grpc.py next to each .proto, so the folder spells the import path voicemesh.v1."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(path.relative_to(HERE)) for path in PACKAGE.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={HERE}", f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


if __name__ == "__main__" and sys.argv[1:] == ["stubs"]:  # `make stubs`: regenerate in place
    generate_stubs()
else:
    setup(cmdclass={"build_py": BuildPyWithStubs})
