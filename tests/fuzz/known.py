"""Reader bugs already reported, with strict-xfail regression tests in tests/test_fuzz_pcap.py.

The hypothesis properties and the atheris harness tolerate exactly these (a struct.error raised by unpack_from in
one of these PcapReader methods) so they keep searching for new bugs instead of stopping at the known ones. When
pcap.py is fixed, the xfail tests start passing (strict: that fails), and this set should be emptied.
"""

from __future__ import annotations

import struct
import traceback

# _start: an input of 1-3 bytes; _add_interface: an IDB under 16 bytes or an option cut by the block's end;
# _packet: an EPB or PB under 28 bytes.
KNOWN_STRUCT_ERRORS: set[str] = set()  # all fixed in pcap.py; keep the mechanism for the next find


def known_pcap_bug(exc: BaseException, data: bytes) -> str | None:
    """The known bug's site if `exc` is one, else None."""
    if not isinstance(exc, struct.error) or exc.__traceback__ is None:
        return None
    last = traceback.extract_tb(exc.__traceback__)[-1]  # unpack_from is C code: the caller is the last frame
    if not last.filename.endswith("pcap.py") or last.name not in KNOWN_STRUCT_ERRORS:
        return None
    if last.name == "_start" and len(data) >= 4:
        return None
    return last.name
