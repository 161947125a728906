"""Fuzz the XenStore daemon core: arbitrary bytes from a dom0 and a guest connection.

Run: ``python fuzz/fuzz_xenstore.py CORPUS_COPY -max_total_time=60`` (atheris; libFuzzer
adds new inputs to the first directory, so give it a copy), or replay the committed corpus
without atheris (CI): ``python fuzz/fuzz_xenstore.py --corpus-only fuzz/corpus/xenstore``.

Checks: ``Connection.receive`` never raises; every reply decodes as whole
``xsd_sockmsg`` frames with payload <= XENSTORE_PAYLOAD_MAX; feeding the input
whole or byte by byte yields the same replies.
"""

from __future__ import annotations

import sys

from virtnet.xen.store import Store
from virtnet.xen.xs_wire import XENSTORE_PAYLOAD_MAX, Decoder


def _run(data: bytes, chunk: int) -> bytes:
    store = Store()
    guest = store.connect(1)
    dom0 = store.connect(0)
    half = len(data) // 2
    out = bytearray()
    for conn, part in ((dom0, data[:half]), (guest, data[half:])):
        for i in range(0, len(part), chunk):
            conn.receive(part[i : i + chunk])
        out += conn.data_to_send()
    return bytes(out)


def test_one_input(data: bytes) -> None:
    whole = _run(data, max(1, len(data)))
    for msg in Decoder().feed(whole):
        assert len(msg.payload) <= XENSTORE_PAYLOAD_MAX
    if len(data) < 512:
        assert _run(data, 1) == whole


if __name__ == "__main__":
    import harness  # fuzz/harness.py: this script's directory is on sys.path

    sys.exit(harness.main("fuzz_xenstore", test_one_input, None))
