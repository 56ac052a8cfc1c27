// The Bilibili live danmaku protocol, as a browser speaks it (docs/protocol.md).
// Wire facts only: no DOM, no sockets. room.js drives it.
//
// Every packet: 16-byte big-endian header (u32 packet_len, u16 header_len = 16, u16 ver,
// u32 op, u32 seq), then the body. ver 2 bodies are zlib (RFC 1950) of a run of complete
// packets, which the browser's own DecompressionStream("deflate") inflates: no decoder to ship.
"use strict";

const BarrageProtocol = (() => {
  const HEADER_BYTES = 16;
  const OP = { HEARTBEAT: 2, HEARTBEAT_REPLY: 3, MESSAGE: 5, AUTH: 7, AUTH_REPLY: 8 };
  const VER = { PLAIN: 0, INT: 1, ZLIB: 2, BROTLI: 3 };
  // The high bit of an outer op 5 seq marks the high-priority stream (DESIGN §11).
  const HIGH_SEQ_BIT = 0x80000000;
  const enc = new TextEncoder();
  const dec = new TextDecoder();

  function packet(op, body, ver = VER.INT, seq = 1) {
    const b = typeof body === "string" ? enc.encode(body) : body;
    const out = new Uint8Array(HEADER_BYTES + b.length);
    const v = new DataView(out.buffer);
    v.setUint32(0, out.length);
    v.setUint16(4, HEADER_BYTES);
    v.setUint16(6, ver);
    v.setUint32(8, op);
    v.setUint32(12, seq);
    out.set(b, HEADER_BYTES);
    return out;
  }

  // The top-level packets of one WebSocket message. A bad length ends the walk: what was
  // read before it is kept, the rest is dropped (a broken peer must not hang the page).
  function split(buf) {
    const bytes = new Uint8Array(buf);
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = [];
    let at = 0;
    while (at + HEADER_BYTES <= bytes.length) {
      const len = v.getUint32(at);
      const hlen = v.getUint16(at + 4);
      if (len < HEADER_BYTES || hlen < HEADER_BYTES || hlen > len || at + len > bytes.length) break;
      out.push({
        ver: v.getUint16(at + 6),
        op: v.getUint32(at + 8),
        seq: v.getUint32(at + 12),
        body: bytes.subarray(at + hlen, at + len),
      });
      at += len;
    }
    return out;
  }

  async function inflate(body) {
    const stream = new Blob([body]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // Flattens containers: resolves to [{op, seq, outerSeq, json}] in wire order.
  async function messages(p, outerSeq = p.seq) {
    if (p.op !== OP.MESSAGE) return [];
    if (p.ver === VER.ZLIB) {
      const inner = split(await inflate(p.body));
      const out = [];
      for (const q of inner) out.push(...(await messages(q, outerSeq)));
      return out;
    }
    if (p.ver === VER.PLAIN) {
      try {
        return [{ seq: p.seq, outerSeq, json: JSON.parse(dec.decode(p.body)) }];
      } catch (e) {
        return [];
      }
    }
    return []; // brotli (ver 3) is never asked for: the page sends protover 2.
  }

  function authBody({ room, token, buvid, resume }) {
    const body = { uid: 0, roomid: room, protover: 2, platform: "web", type: 2, key: token, buvid };
    if (resume) body.resume = resume;
    return JSON.stringify(body);
  }

  function u32(body) {
    return body.length >= 4 ? new DataView(body.buffer, body.byteOffset, 4).getUint32(0) : null;
  }

  return { OP, VER, HIGH_SEQ_BIT, packet, split, messages, authBody, u32, decode: (b) => dec.decode(b) };
})();
