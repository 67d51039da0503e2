"""Is NVDEC usable here? Answered in seconds, before DALI's four-part install is spent on a machine,
and before ``decoder="auto"`` hands a GPU run's decoding to DALI.

    python -m stop_fast.data.nvdec              # one JSON line; exit status 0 when NVDEC decodes H.264

Standard library and ctypes only (no torch, no DALI): the steps a video decode needs, each one's
failure the reason given:

1. ``ldconfig -p | grep nvcuvid``: is the driver's video decode library registered (containers
   without the "video" driver capability lack it);
2. load ``libcuda.so.1`` and ``libnvcuvid.so.1``;
3. ``cuInit``, device 0, its primary context made current (and the caller's current context put
   back afterwards, so a process that already runs CUDA work is left as it was);
4. ``cuvidGetDecoderCaps`` for H.264 8-bit 4:2:0 (what ``stop-fast prepare``'s copies are), and
   for the record HEVC, VP9, AV1 and JPEG (MJPEG) too, with the number of NVDEC engines each has.

Prints ``{"nvdec_available": ..., "reason": ..., "ldconfig_nvcuvid": [...], "device": ..., "codecs": {...}}``.
"""
from __future__ import annotations

import ctypes
import functools
import json
import subprocess
import sys
from typing import Callable, Dict, List, Optional

# cudaVideoCodec and cudaVideoChromaFormat (nvcuvid.h / cuviddec.h)
CODECS = {"h264": 4, "jpeg": 5, "hevc": 8, "vp9": 10, "av1": 11}
CHROMA_420 = 1


class DecoderCaps(ctypes.Structure):
    """CUVIDDECODECAPS (cuviddec.h), with room to spare at the end for newer SDKs' fields."""

    _fields_ = [
        ("eCodecType", ctypes.c_int), ("eChromaFormat", ctypes.c_int), ("nBitDepthMinus8", ctypes.c_uint),
        ("reserved1", ctypes.c_uint * 3),
        ("bIsSupported", ctypes.c_ubyte), ("nNumNVDECs", ctypes.c_ubyte), ("nOutputFormatMask", ctypes.c_ushort),
        ("nMaxWidth", ctypes.c_uint), ("nMaxHeight", ctypes.c_uint), ("nMaxMBCount", ctypes.c_uint),
        ("nMinWidth", ctypes.c_ushort), ("nMinHeight", ctypes.c_ushort),
        ("bIsHistogramSupported", ctypes.c_ubyte), ("nCounterBitDepth", ctypes.c_ubyte),
        ("nMaxHistogramBins", ctypes.c_ushort),
        ("reserved3", ctypes.c_uint * 32),
    ]


def ldconfig_nvcuvid() -> List[str]:
    """The lines of ``ldconfig -p`` that name nvcuvid (empty when none, or no ldconfig)."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        return [line.strip() for line in out.stdout.splitlines() if "nvcuvid" in line]
    return []


def probe(load: Callable[[str], object] = ctypes.CDLL, ldconfig: Callable[[], List[str]] = ldconfig_nvcuvid,
          device_index: int = 0) -> Dict:
    """The answer for CUDA device ``device_index`` as a dict (see the module docstring). ``load`` and
    ``ldconfig`` are replaceable so that every failure path can be tested on a machine without a GPU."""
    result: Dict = {"nvdec_available": False, "reason": "", "ldconfig_nvcuvid": ldconfig(), "device": None,
                    "codecs": {}}

    def fail(reason: str) -> Dict:
        result["reason"] = reason
        return result

    try:
        cuda = load("libcuda.so.1")
    except OSError as exc:
        return fail(f"no CUDA driver: libcuda.so.1 does not load ({exc})")
    try:
        nvcuvid = load("libnvcuvid.so.1")
    except OSError as exc:
        where = "registered in ldconfig but" if result["ldconfig_nvcuvid"] else "not in `ldconfig -p` and"
        return fail(f"no NVDEC library: libnvcuvid.so.1 is {where} does not load ({exc}); a container needs the "
                    "driver's 'video' capability (NVIDIA_DRIVER_CAPABILITIES=compute,utility,video)")

    def call(name: str, *args) -> Optional[str]:
        """None on success, else the failure as text."""
        code = getattr(cuda, name)(*args)
        if code == 0:
            return None
        text = ctypes.c_char_p()
        cuda.cuGetErrorName(code, ctypes.pointer(text))
        return f"{name} failed with {code} ({(text.value or b'?').decode()})"

    error = call("cuInit", ctypes.c_uint(0))
    if error:
        return fail(error)
    count = ctypes.c_int(0)
    error = call("cuDeviceGetCount", ctypes.pointer(count))
    if error or count.value < 1:
        return fail(error or "cuDeviceGetCount: no CUDA device")
    device = ctypes.c_int(0)
    error = call("cuDeviceGet", ctypes.pointer(device), ctypes.c_int(device_index))
    if error:
        return fail(error)
    name = ctypes.create_string_buffer(256)
    if call("cuDeviceGetName", name, ctypes.c_int(256), device) is None:
        result["device"] = name.value.decode(errors="replace")
    previous, context = ctypes.c_void_p(), ctypes.c_void_p()
    error = call("cuCtxGetCurrent", ctypes.pointer(previous)) or call("cuDevicePrimaryCtxRetain", ctypes.pointer(context), device)
    if error:
        return fail(error)
    error = call("cuCtxSetCurrent", context)
    if error:
        cuda.cuDevicePrimaryCtxRelease(device)  # what was retained is released on every path
        return fail(error)
    try:
        for codec, number in CODECS.items():
            caps = DecoderCaps(eCodecType=number, eChromaFormat=CHROMA_420, nBitDepthMinus8=0)
            code = nvcuvid.cuvidGetDecoderCaps(ctypes.pointer(caps))
            result["codecs"][codec] = ({"supported": bool(caps.bIsSupported), "nvdecs": int(caps.nNumNVDECs),
                                        "max_width": int(caps.nMaxWidth), "max_height": int(caps.nMaxHeight)}
                                       if code == 0 else {"supported": False, "error": int(code)})
    finally:
        cuda.cuCtxSetCurrent(previous)
        cuda.cuDevicePrimaryCtxRelease(device)
    h264 = result["codecs"]["h264"]
    if not h264.get("supported"):
        return fail(f"cuvidGetDecoderCaps: H.264 8-bit 4:2:0 is not supported ({h264})")
    result["nvdec_available"] = True
    result["reason"] = f"cuvidGetDecoderCaps: H.264 8-bit 4:2:0 on {h264['nvdecs']} NVDEC engine(s) of {result['device']}"
    return result


@functools.lru_cache(maxsize=None)
def nvdec_usable(device_index: int = 0) -> bool:
    """Whether NVDEC of CUDA device ``device_index`` decodes H.264 (:func:`probe`, asked once per
    process and device: under torchrun each rank asks about its own GPU)."""
    return probe(device_index=device_index)["nvdec_available"]


def main() -> int:
    result = probe()
    print(json.dumps(result))
    return 0 if result["nvdec_available"] else 1


if __name__ == "__main__":
    sys.exit(main())
