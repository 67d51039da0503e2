"""stop_fast.data.nvdec: whether NVDEC decodes H.264 here, with the reason, in seconds."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

from stop_fast.data import nvdec as nvdec_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_script_answers_in_one_json_line():
    out = subprocess.run([sys.executable, "-m", "stop_fast.data.nvdec"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=REPO))
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stderr
    result = json.loads(lines[0])
    assert out.returncode == (0 if result["nvdec_available"] else 1)
    assert result["reason"] and isinstance(result["ldconfig_nvcuvid"], list)
    if not result["nvdec_available"]:  # this machine: no driver, or a driver without the video library
        steps = ("libcuda.so.1", "libnvcuvid.so.1", "cuInit", "cuDevice", "cuCtxSetCurrent", "cuvidGetDecoderCaps")
        assert any(step in result["reason"] for step in steps), result["reason"]


class FakeCuda:
    """libcuda's calls as the probe makes them; ``fail`` names one that returns an error."""

    def __init__(self, fail=None):
        self.fail = fail
        self.released = self.retained = False
        self.device_asked = None

    def __getattr__(self, name):
        def call(*args):
            if name == self.fail:
                return 100
            if name == "cuDevicePrimaryCtxRetain":
                self.retained = True
            if name == "cuDeviceGet":
                self.device_asked = args[1].value
            if name == "cuDeviceGetCount":
                args[0].contents.value = 1
            if name == "cuDeviceGetName":
                ctypes.memmove(args[0], b"Fake H100\0", 10)
            if name == "cuDevicePrimaryCtxRelease":
                self.released = True
            if name == "cuCtxGetCurrent":
                args[0].contents.value = 1234  # the caller's context, to be put back
            if name == "cuCtxSetCurrent":
                self.current = args[0].value
            if name == "cuGetErrorName":
                args[1].contents.value = b"CUDA_ERROR_NO_DEVICE"
            return 0
        return call


class FakeNvcuvid:
    def __init__(self, h264=True):
        self.h264 = h264

    def cuvidGetDecoderCaps(self, caps):
        caps.contents.bIsSupported = int(self.h264 or caps.contents.eCodecType != nvdec_probe.CODECS["h264"])
        caps.contents.nNumNVDECs = 7
        caps.contents.nMaxWidth, caps.contents.nMaxHeight = 8192, 8192
        return 0


def _loader(cuda=None, nvcuvid=None):
    def load(name):
        lib = cuda if "cuda" in name else nvcuvid
        if lib is None:
            raise OSError(f"{name}: cannot open shared object file")
        return lib
    return load


@pytest.mark.parametrize("cuda, nvcuvid, ldconfig, expected", [
    (None, None, [], "no CUDA driver"),
    (FakeCuda(), None, [], "not in `ldconfig -p`"),
    (FakeCuda(), None, ["libnvcuvid.so.1 (libc6,x86-64) => /usr/lib/libnvcuvid.so.1"], "registered in ldconfig but"),
    (FakeCuda(fail="cuInit"), FakeNvcuvid(), [], "cuInit failed with 100 (CUDA_ERROR_NO_DEVICE)"),
    (FakeCuda(fail="cuDevicePrimaryCtxRetain"), FakeNvcuvid(), [], "cuDevicePrimaryCtxRetain failed"),
    (FakeCuda(fail="cuCtxSetCurrent"), FakeNvcuvid(), [], "cuCtxSetCurrent failed"),
    (FakeCuda(), FakeNvcuvid(h264=False), [], "H.264 8-bit 4:2:0 is not supported"),
])
def test_every_missing_piece_is_the_reason(cuda, nvcuvid, ldconfig, expected):
    result = nvdec_probe.probe(load=_loader(cuda, nvcuvid), ldconfig=lambda: ldconfig)
    assert result["nvdec_available"] is False and expected in result["reason"]
    assert result["ldconfig_nvcuvid"] == ldconfig
    assert cuda is None or cuda.released == cuda.retained  # a retained context is always released


def test_a_machine_with_nvdec_says_how_many_engines():
    cuda = FakeCuda()
    result = nvdec_probe.probe(load=_loader(cuda, FakeNvcuvid()), ldconfig=lambda: [], device_index=3)
    assert cuda.device_asked == 3  # the GPU of the caller (a torchrun rank's), not always GPU 0
    assert result["nvdec_available"] is True and result["device"] == "Fake H100"
    assert result["codecs"]["h264"] == {"supported": True, "nvdecs": 7, "max_width": 8192, "max_height": 8192}
    assert set(result["codecs"]) == {"h264", "jpeg", "hevc", "vp9", "av1"} and cuda.released
    assert cuda.current == 1234  # the caller's current context is current again
    assert "7 NVDEC engine(s)" in result["reason"]
