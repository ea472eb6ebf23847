#!/usr/bin/env python3
"""Reference CLIENT for tidewire's interop tests, built on Python
`websockets`: runs a scripted conversation against an ECHO server and exits 0
only if every check passed.

    .venv/bin/python tests/interop/py_client.py URL [--require-deflate]
                                                    [--timeout SECS] [--ca-file PEM]

Checks, in order, one output line each ("PASS <check>" or
"FAIL <check>: <why>"), then "RESULT: PASS" or "RESULT: FAIL (n failed)":
  connect    opening handshake (prints the negotiated extensions; with
             --require-deflate, fails unless permessage-deflate was agreed)
  text       "hello" echoed as text
  large      a 100 KiB compressible text message echoed
  binary     bytes 0..255 echoed as binary
  fragmented a text message sent as 4 fragments (async iterator) echoed as
             the whole message
  ping       ping with payload answered by a pong
  close      close with 4000 "done"; the server's close frame echoes 4000

Exit status: 0 all passed, 1 a check failed, 2 usage error. Gives up after
--timeout seconds (default 30) in total.
"""
import argparse
import ssl
import asyncio
import os
import sys

# websockets >= 15 limits fragments per message (env, read at import)
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", "1000000")

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

STEP_TIMEOUT = 10.0


class Checks:
    def __init__(self):
        self.failed = []

    def ok(self, name, detail=""):
        print("PASS %s%s" % (name, (" (" + detail + ")") if detail else ""), flush=True)

    def fail(self, name, why):
        self.failed.append(name)
        print("FAIL %s: %s" % (name, why), flush=True)


def short(v, n=60):
    r = repr(v)
    return r if len(r) <= n else r[:n] + "...(%d)" % len(v)


async def echo_check(ws, checks, name, payload, sender=None):
    """Send payload (or run sender()) and compare the echo with payload."""
    try:
        if sender is None:
            await ws.send(payload)
        else:
            await sender()
        got = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT)
    except asyncio.TimeoutError:
        checks.fail(name, "no echo within %ss" % STEP_TIMEOUT)
        return
    if type(got) is not type(payload):
        checks.fail(name, "echo is %s, expected %s" % (type(got).__name__, type(payload).__name__))
    elif got != payload:
        checks.fail(name, "echo differs: got %s, expected %s" % (short(got), short(payload)))
    else:
        checks.ok(name, "%d %s" % (len(payload), "chars" if isinstance(payload, str) else "bytes"))


async def conversation(url, require_deflate, checks, ca_file=None):
    extra = {}
    if url.startswith("wss://"):
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        extra["ssl"] = context
    try:
        ws = await connect(url, compression="deflate", max_size=None, max_queue=None,
                           open_timeout=STEP_TIMEOUT, close_timeout=STEP_TIMEOUT,
                           ping_interval=None, **extra)
    except Exception as e:  # noqa: BLE001 - any failure to connect is a FAIL
        checks.fail("connect", "%s: %s" % (type(e).__name__, e))
        return
    ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    if require_deflate and "permessage-deflate" not in ext:
        checks.fail("connect", "permessage-deflate not negotiated (extensions: %r)" % ext)
    else:
        checks.ok("connect", "extensions: %s" % (ext or "none"))

    step = "text"
    try:
        await echo_check(ws, checks, "text", "hello")

        line = "tidewire interop: the quick brown fox jumps over the lazy dog %d\n"
        big, i = [], 0
        while sum(map(len, big)) < 100 * 1024:
            big.append(line % i)
            i += 1
        big = "".join(big)[:100 * 1024]
        step = "large"
        await echo_check(ws, checks, "large", big)

        step = "binary"
        await echo_check(ws, checks, "binary", bytes(range(256)))

        fragments = ["frag-one|", "frag-two|", "frag-three|", "end"]

        async def fragment_iter():
            for f in fragments:
                yield f

        step = "fragmented"
        await echo_check(ws, checks, "fragmented", "".join(fragments),
                         sender=lambda: ws.send(fragment_iter()))

        step = "ping"
        try:
            pong = await ws.ping(b"tidewire-ping")
            latency = await asyncio.wait_for(pong, STEP_TIMEOUT)
            checks.ok("ping", "pong after %.1f ms" % (latency * 1000))
        except asyncio.TimeoutError:
            checks.fail("ping", "no pong within %ss" % STEP_TIMEOUT)

        step = "close"
        await ws.close(4000, "done")
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            checks.fail("close", "no close frame received from the server")
        elif rcvd.code != 4000:
            checks.fail("close", "server closed with %d %r, expected 4000" % (rcvd.code, rcvd.reason))
        else:
            checks.ok("close", "server echoed %d %r" % (rcvd.code, rcvd.reason))
    except ConnectionClosed as e:
        checks.fail(step, "connection closed early: %s" % e)
    finally:
        if ws.state.name != "CLOSED":
            await ws.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--require-deflate", action="store_true",
                    help="fail unless permessage-deflate is negotiated")
    ap.add_argument("--timeout", type=float, default=30.0, help="overall limit in seconds")
    ap.add_argument("--ca-file", default=None, help="for wss://: trust this CA certificate (PEM)")
    args = ap.parse_args()
    checks = Checks()
    try:
        await asyncio.wait_for(conversation(args.url, args.require_deflate, checks, args.ca_file), args.timeout)
    except asyncio.TimeoutError:
        checks.fail("timeout", "conversation did not finish within %ss" % args.timeout)
    except Exception as e:  # noqa: BLE001 - report, never a bare traceback
        checks.fail("conversation", "unexpected %s: %s" % (type(e).__name__, e))
    if checks.failed:
        print("RESULT: FAIL (%d failed: %s)" % (len(checks.failed), ", ".join(checks.failed)), flush=True)
        return 1
    print("RESULT: PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
