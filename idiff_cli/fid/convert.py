"""One-off conversion of pytorch-fid's published Inception weights to the .npz that `inception` loads.

    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m idiff_cli.fid.convert pt_inception-2015-12-05-6726825d.pth ~/.cache/idiff/inception-2015-12-05.npz
    export IDIFF_INCEPTION_WEIGHTS=~/.cache/idiff/inception-2015-12-05.npz

The source file must have the pinned SHA-256 below (95,628,359 bytes), the weights TensorFlow's FID
code uses, ported by pytorch-fid. PyTorch is not needed: the .pth file (zip or legacy format) is
read with a restricted unpickler that only rebuilds tensors into NumPy arrays and executes nothing
else. Names map one to one (`Mixed_5b.branch1x1.conv.weight` [O,I,H,W] -> params
`Mixed_5b/branch1x1/conv/kernel` [H,W,I,O]; `bn.weight/bias/running_mean/running_var` -> `scale`,
`bias`, batch_stats `mean`, `var`); the 1008-way classifier `fc.*` is dropped (the FID uses the
2048-d pool features). The .npz records the source checksum as `meta/source_sha256`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import pickle
import struct
import zipfile
from typing import Mapping

import numpy as np

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
PINNED_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PINNED_BYTES = 95_628_359

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "ByteStorage": np.uint8, "CharStorage": np.int8, "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def sha256_of(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """A thunk: legacy files append the storages' bytes after the pickle, so arrays are built last."""

    def build():
        array = storage()
        itemsize = array.dtype.itemsize
        return np.array(np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(size),
                                                        strides=tuple(s * itemsize for s in stride)))

    return build


def _rebuild_parameter(tensor, *unused):
    return tensor


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Unpickler(pickle.Unpickler):
    """Rebuilds a PyTorch state dict as NumPy arrays; any other global is refused."""

    _ALLOWED = {("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2"): lambda: _rebuild_tensor,
                ("torch._utils", "_rebuild_tensor"): lambda: _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): lambda: _rebuild_parameter}

    def __init__(self, file, storage_bytes):
        super().__init__(file)
        self.storage_bytes, self.storages = storage_bytes, {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return lambda: _StorageType(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]()
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight file")

    def persistent_load(self, pid):
        kind, storage_type, key = pid[0], pid[1], str(pid[2])
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        dtype = storage_type().dtype if callable(storage_type) else storage_type.dtype
        self.storages.setdefault(key, dtype)
        return lambda: np.frombuffer(self.storage_bytes(key), dtype=self.storages[key])


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A PyTorch `torch.save(state_dict)` file (zip or legacy format) as {name: array}, without torch."""
    path = pathlib.Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            prefix = pkl[: -len("data.pkl")]
            raw = {n[len(prefix) + 5:]: n for n in archive.namelist() if n.startswith(prefix + "data/")}
            unpickler = _Unpickler(io.BytesIO(archive.read(pkl)), lambda key: archive.read(raw[key]))
            return {name: build() for name, build in unpickler.load().items()}
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC or pickle.load(f) != 1001:
            raise ValueError(f"'{path}' is not a PyTorch weight file")
        pickle.load(f)  # system info
        blobs: dict[str, bytes] = {}
        unpickler = _Unpickler(f, lambda key: blobs[key])
        result = unpickler.load()
        for key in pickle.load(f):  # each storage: int64 element count, then its raw bytes
            (count,) = struct.unpack("<q", f.read(8))
            blobs[key] = f.read(count * unpickler.storages[key].itemsize)
        return {name: build() for name, build in result.items()}


def to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid names -> flat `{"params/.../kernel": array, "batch_stats/.../mean": array}`."""
    flat = {}
    for name, value in state_dict.items():
        *module, leaf = name.split(".")
        if module[:1] in (["fc"], ["AuxLogits"]) or leaf == "num_batches_tracked":
            continue
        where = "/".join(module)
        if module[-1] == "conv" and leaf == "weight":
            flat[f"params/{where}/kernel"] = np.transpose(value, (2, 3, 1, 0))
        elif module[-1] == "bn" and leaf in ("weight", "bias"):
            flat[f"params/{where}/{'scale' if leaf == 'weight' else 'bias'}"] = value
        elif module[-1] == "bn" and leaf in ("running_mean", "running_var"):
            flat[f"batch_stats/{where}/{'mean' if leaf == 'running_mean' else 'var'}"] = value
        else:
            raise ValueError(f"unexpected tensor '{name}' in the Inception weight file")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def convert(source: str | pathlib.Path, target: str | pathlib.Path, check_sha256: bool = True) -> str:
    """Converts pytorch-fid's .pth to .npz (flat variables + meta/source_sha256); returns the checksum."""
    digest = sha256_of(source)
    if check_sha256 and digest != PINNED_SHA256:
        raise ValueError(f"'{source}' has sha256 {digest}, not the pinned pytorch-fid weights {PINNED_SHA256}")
    flat = to_flax(read_state_dict(source))
    target = pathlib.Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, **flat, **{"meta/source_sha256": np.array(digest)})
    return digest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="pt_inception-2015-12-05-6726825d.pth from " + WEIGHTS_URL)
    parser.add_argument("target", help="the .npz to write (pass it as --inception-weights)")
    parser.add_argument("--no-check", action="store_true",
                        help="convert a file that is not the pinned one (e.g. random weights for a test)")
    args = parser.parse_args(argv)
    try:
        digest = convert(args.source, args.target, check_sha256=not args.no_check)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.target} (source sha256 {digest})")


if __name__ == "__main__":
    main()
