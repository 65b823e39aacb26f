#!/usr/bin/env python3
"""A TCP proxy on loopback that delays every byte by a fixed time each way (pipelined: the
delay is added to each piece of data, not to each request, so bandwidth is kept and many
requests can be in flight). For benchmarks of granary against an object store at WAN latency.

Usage: latency_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
Listens on 127.0.0.1:LISTEN_PORT and forwards to 127.0.0.1:UPSTREAM_PORT, adding DELAY_MS in
each direction (so a round trip costs 2 x DELAY_MS more). Loopback only, by design.
"""

import asyncio
import sys
import time


async def pump(reader, writer, delay):
    """Copies reader to writer, each piece released `delay` seconds after it arrived."""
    queue = asyncio.Queue()

    async def receive():
        try:
            while True:
                data = await reader.read(1 << 16)
                await queue.put((time.monotonic() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((time.monotonic(), b""))

    async def send():
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    await asyncio.gather(receive(), send())


async def main():
    listen, upstream, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    delay = delay_ms / 1000.0

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pump(client_reader, up_writer, delay), pump(up_reader, client_writer, delay)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
