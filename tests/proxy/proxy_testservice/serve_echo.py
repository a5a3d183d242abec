"""Run an `EchoBackend` in a process of its own, so a test can kill it mid-stream.

    python serve_echo.py NAME [PORT]

Prints ``PORT <n>`` once serving; runs until killed.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy_testservice import EchoBackend


async def main(name: str, port: int) -> None:
    backend = await EchoBackend(name).start(port)
    print(f"PORT {backend.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
