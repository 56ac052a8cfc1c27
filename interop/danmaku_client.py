#!/usr/bin/env python3
"""A minimal Bilibili-live danmaku client, written the way public third-party clients are
(getInfoByRoom -> getDanmuInfo -> WebSocket /sub -> op 7 auth -> op 2 heartbeats every 30 s),
using aiohttp and brotli from PyPI. barrage's interop test runs it against the real stack.

Prints every op 5 JSON body on stdout, one compact JSON object per line; auth and heartbeat
replies go to stderr. Exits 0 after --count messages, 1 on a timeout or a refused auth.
"""

import argparse
import asyncio
import json
import random
import struct
import sys
import zlib

import aiohttp
import brotli

HEADER = struct.Struct(">IHHII")  # packet_len, header_len, ver, op, seq
OP_HEARTBEAT, OP_HEARTBEAT_REPLY, OP_MESSAGE, OP_AUTH, OP_AUTH_REPLY = 2, 3, 5, 7, 8


def packet(op: int, body: bytes, ver: int = 1, seq: int = 1) -> bytes:
    return HEADER.pack(HEADER.size + len(body), HEADER.size, ver, op, seq) + body


def split(data: bytes):
    """Yields (ver, op, body) for every packet, unpacking zlib (ver 2) and brotli (ver 3)."""
    offset = 0
    while offset + HEADER.size <= len(data):
        plen, hlen, ver, op, _seq = HEADER.unpack_from(data, offset)
        if plen < hlen or offset + plen > len(data):
            raise ValueError(f"bad packet length {plen} at {offset}")
        body = data[offset + hlen: offset + plen]
        offset += plen
        if op == OP_MESSAGE and ver == 2:
            yield from split(zlib.decompress(body))
        elif op == OP_MESSAGE and ver == 3:
            yield from split(brotli.decompress(body))
        else:
            yield ver, op, body


async def get_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as resp:
        data = await resp.json(content_type=None)
        if data.get("code") != 0:
            raise RuntimeError(f"{url} answered {data}")
        return data["data"]


async def heartbeats(ws):
    while True:
        await ws.send_bytes(packet(OP_HEARTBEAT, b"[object Object]"))
        await asyncio.sleep(30)


async def run(base: str, room: int, count: int) -> int:
    async with aiohttp.ClientSession() as session:
        info = await get_json(session, f"{base}/xlive/web-room/v1/index/getInfoByRoom?room_id={room}")
        room_id = info["room_info"]["room_id"]
        danmu = await get_json(session, f"{base}/xlive/web-room/v1/index/getDanmuInfo?id={room_id}&type=0")
        if not danmu["host_list"]:
            print("no edge in host_list", file=sys.stderr)
            return 1
        host = danmu["host_list"][0]
        url = f"ws://{host['host']}:{host['ws_port']}/sub"
        print(f"connecting to {url}, room {room_id}", file=sys.stderr)
        async with session.ws_connect(url) as ws:
            auth = {
                "uid": 0,
                "roomid": room_id,
                "protover": 3,
                "buvid": f"interop-{random.getrandbits(64):016x}",
                "platform": "web",
                "type": 2,
                "key": danmu["token"],
            }
            await ws.send_bytes(packet(OP_AUTH, json.dumps(auth).encode()))
            beat = None
            printed = 0
            try:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        print(f"websocket {msg.type}", file=sys.stderr)
                        break
                    for ver, op, body in split(msg.data):
                        if op == OP_AUTH_REPLY:
                            code = json.loads(body).get("code")
                            print(f"auth reply code {code}", file=sys.stderr)
                            if code != 0:
                                return 1
                            beat = asyncio.ensure_future(heartbeats(ws))
                        elif op == OP_HEARTBEAT_REPLY:
                            print(f"online {struct.unpack('>I', body[:4])[0]}", file=sys.stderr)
                        elif op == OP_MESSAGE and ver == 0:
                            obj = json.loads(body)
                            print(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), flush=True)
                            printed += 1
                            if printed >= count:
                                return 0
            finally:
                if beat is not None:
                    beat.cancel()
    return 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="http://127.0.0.1:8080", help="control's base URL")
    p.add_argument("--room", type=int, required=True)
    p.add_argument("--count", type=int, default=1_000_000_000, help="exit after this many messages")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    a = p.parse_args()
    try:
        return asyncio.run(asyncio.wait_for(run(a.base.rstrip("/"), a.room, a.count), a.timeout))
    except asyncio.TimeoutError:
        print("timed out", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
