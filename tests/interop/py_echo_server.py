#!/usr/bin/env python3
"""Reference echo SERVER for tidewire's interop tests, built on Python
`websockets` (tests/interop/requirements.txt, installed into .venv by
scripts/install-deps). permessage-deflate on, no message size limit, fragment
limit lifted (as in tests/autobahn/examples/websockets_echo_server.py).

    .venv/bin/python tests/interop/py_echo_server.py [PORT] [--close-after N]
                                                     [--lifetime SECS]

PORT      port on 127.0.0.1 (default 0 = ephemeral)
--close-after N   after echoing N messages on a connection, close it with
                  code 4001 reason "bye"
--lifetime SECS   exit after SECS seconds at the latest (default 300)

Prints "READY <port>" on stdout once it listens. Exits by itself: when its
parent process goes away, after --lifetime, or on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import os
import signal
import sys

# websockets >= 15 limits fragments per message (4096, env
# WEBSOCKETS_MAX_FRAGMENTS, read at import). Lift it unless the caller set it.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", "1000000")

from websockets.asyncio.server import serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", nargs="?", type=int, default=0)
    ap.add_argument("--close-after", type=int, default=None, metavar="N")
    ap.add_argument("--lifetime", type=float, default=300.0, metavar="SECS")
    return ap.parse_args()


async def watch_parent(stop):
    parent = os.getppid()
    while not stop.done():
        if os.getppid() != parent:  # re-parented: whoever started us is gone
            stop.set_result("parent exited")
            return
        await asyncio.sleep(0.5)


async def main(args):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s.name))
    loop.call_later(args.lifetime, lambda: stop.done() or stop.set_result("lifetime"))

    async def echo(ws):
        count = 0
        try:
            async for msg in ws:
                await ws.send(msg)
                count += 1
                if args.close_after is not None and count >= args.close_after:
                    await ws.close(4001, "bye")
                    return
        except ConnectionClosed:
            pass

    async with serve(echo, "127.0.0.1", args.port, compression="deflate",
                     max_size=None, max_queue=None) as server:
        port = server.sockets[0].getsockname()[1]
        print("READY %d" % port, flush=True)
        watcher = asyncio.ensure_future(watch_parent(stop))
        reason = await stop
        watcher.cancel()
        print("py_echo_server: stopping (%s)" % reason, file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
