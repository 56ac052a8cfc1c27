// The live room page: what a viewer's browser does on the real site.
// discovery (getDanmuInfo) -> WebSocket to the first host -> op 7 auth -> op 2 every 30 s;
// op 5 containers decoded in arrival order; op 3 is the online count. On a close it walks
// host_list, then asks discovery again, and says so in the banner when nothing answered.
"use strict";

(() => {
  const P = BarrageProtocol;
  const body = document.body;
  const ROOM = Number(body.dataset.room);
  const HEARTBEAT_MS = 30000;
  const BACKOFF_MS_MAX = 10000;
  const CHAT_ITEMS_MAX = 100;
  const EVENT_ITEMS_MAX = 50;
  const QUEUE_ITEMS_MAX = 300;
  const FLIGHT_MS = 8000; // time a danmaku takes to cross; longer text moves faster
  const LANE_GAP_PX = 24;

  const $ = (id) => document.getElementById(id);
  const el = {
    online: $("online"), status: $("status"), lanes: $("lanes"), banner: $("banner"),
    chat: $("chat"), events: $("events"), player: $("player"),
  };

  // A device id per browser, as buvid is on the real site.
  const buvid = (() => {
    try {
      let v = localStorage.getItem("barrage.buvid");
      if (!v) {
        v = "web-" + crypto.getRandomValues(new Uint32Array(2)).join("");
        localStorage.setItem("barrage.buvid", v);
      }
      return v;
    } catch (e) {
      return "web-anon";
    }
  })();

  // What the test and a curious reader can look at: window.barrage.
  const state = {
    room: ROOM, ws: null, url: null, connects: 0, received: 0, online: null,
    epoch: null, seq: null, sync: null, closes: 0,
  };
  window.barrage = state;

  function setStatus(kind, text) {
    el.status.className = "status " + kind;
    el.status.textContent = text;
  }
  function banner(text) {
    el.banner.textContent = text || "";
    el.banner.classList.toggle("hidden", !text);
  }

  // ---- rendering -------------------------------------------------------------------------

  let shown = 0;
  function trim(list, max) {
    while (list.children.length > max) list.removeChild(list.firstChild);
  }
  function addItem(list, cls, parts, max) {
    const li = document.createElement("li");
    li.className = cls;
    for (const [c, t] of parts) {
      const s = document.createElement("span");
      s.className = c;
      s.textContent = t;
      li.appendChild(s);
    }
    list.appendChild(li);
    trim(list, max);
    list.scrollTop = list.scrollHeight;
    return li;
  }

  // Lanes: one row per line height. A lane is free for a new item when the previous item's
  // tail has entered the screen and the new one (maybe faster) cannot catch it before it leaves.
  const lanes = [];
  const queue = [];
  function laneCount() {
    const h = el.lanes.clientHeight || 360;
    return Math.max(1, Math.floor((h - 8) / 34));
  }
  function fits(lane, width, speed, now, W) {
    const last = lanes[lane];
    if (!last) return true;
    const t = (now - last.start) / 1000;
    const tail = t * last.speed - last.width; // distance the old tail has moved in from the right
    if (tail < LANE_GAP_PX) return false;
    if (speed <= last.speed) return true;
    const leaves = (W + last.width) / last.speed - t; // seconds until the old tail leaves
    return (tail - LANE_GAP_PX) / (speed - last.speed) >= leaves;
  }
  function fly(item) {
    const W = el.lanes.clientWidth || 640;
    const node = document.createElement("div");
    node.className = "dm";
    node.textContent = item.text;
    if (item.color && item.color !== 0xffffff) {
      node.style.color = "#" + item.color.toString(16).padStart(6, "0");
    }
    node.style.visibility = "hidden";
    el.lanes.appendChild(node);
    const width = node.offsetWidth;
    const speed = (W + width) / (FLIGHT_MS / 1000); // px/s: longer text, faster
    const now = performance.now();
    const n = laneCount();
    let lane = -1;
    for (let i = 0; i < n; i++) {
      if (fits(i, width, speed, now, W)) { lane = i; break; }
    }
    if (lane < 0) {
      el.lanes.removeChild(node);
      return false;
    }
    lanes[lane] = { start: now, width, speed };
    node.style.top = 6 + lane * 34 + "px";
    node.style.visibility = "visible";
    const anim = node.animate(
      [{ transform: `translateX(${W}px)` }, { transform: `translateX(${-width}px)` }],
      { duration: FLIGHT_MS, easing: "linear" });
    anim.onfinish = () => node.remove();
    return true;
  }
  function pump() {
    while (queue.length && fly(queue[0])) queue.shift();
  }
  setInterval(pump, 120);

  function danmaku(text, name, color) {
    shown += 1;
    const li = addItem(el.chat, "dm-line", [["who", name || "guest"], ["what", text]], CHAT_ITEMS_MAX);
    li.dataset.n = String(shown);
    if (queue.length >= QUEUE_ITEMS_MAX) queue.shift();
    queue.push({ text, color });
    pump();
  }

  function event(kind, text) {
    addItem(el.events, "ev ev-" + kind, [["tag", kind], ["what", text]], EVENT_ITEMS_MAX);
  }

  function render(m) {
    const j = m.json || {};
    const cmd = String(j.cmd || "");
    state.received += 1;
    if (cmd.startsWith("DANMU_MSG")) {
      const info = Array.isArray(j.info) ? j.info : [];
      const user = Array.isArray(info[2]) ? info[2] : [];
      const meta = Array.isArray(info[0]) ? info[0] : [];
      danmaku(String(info[1] ?? ""), String(user[1] ?? ""), Number(meta[3]) || 0xffffff);
    } else if (cmd === "SEND_GIFT") {
      const d = j.data || {};
      event("gift", `${d.uname || "someone"} sent ${d.giftName || "a gift"} ×${d.num || 1}`);
    } else if (cmd === "NOTICE_MSG") {
      event("notice", String(j.msg_common || j.msg_self || "notice"));
    } else if (cmd === "INTERACT_WORD") {
      event("enter", `${(j.data && j.data.uname) || "someone"} entered`);
    } else if (cmd === "SUPER_CHAT_MESSAGE") {
      const d = j.data || {};
      event("super", `${(d.user_info && d.user_info.uname) || "someone"}: ${d.message || ""}`);
    } else if (cmd === "BARRAGE_SYNC") {
      state.sync = j;
      if (j.epoch !== undefined) state.epoch = j.epoch;
      event("sync", j.recovered ? `resumed, ${j.missed || 0} missed` : `not resumed (${j.missed || 0} missed)`);
    } else if (cmd) {
      event("other", cmd);
    }
  }

  // ---- connection ------------------------------------------------------------------------

  let hosts = [];
  let token = null;
  let hostIndex = 0;
  let failedWalks = 0;
  let heartbeat = null;
  let decoding = Promise.resolve();

  async function discover() {
    const r = await fetch(`/xlive/web-room/v1/index/getDanmuInfo?id=${ROOM}&type=0`, { cache: "no-store" });
    const j = await r.json();
    if (j.code !== 0) throw new Error(j.message || `discovery code ${j.code}`);
    token = j.data.token;
    const https = location.protocol === "https:";
    hosts = (j.data.host_list || [])
      .filter((h) => (https ? h.wss_port : h.ws_port))
      .map((h) => `${https ? "wss" : "ws"}://${h.host}:${https ? h.wss_port : h.ws_port}/sub`);
    hostIndex = 0;
    if (!hosts.length) throw new Error("no edge is up");
  }

  function onPacket(p, ws) {
    if (p.op === P.OP.AUTH_REPLY) {
      let code = -1;
      try { code = JSON.parse(P.decode(p.body)).code; } catch (e) { /* stays -1 */ }
      if (code !== 0) {
        banner(`The edge refused the token (code ${code}); asking for a new one.`);
        token = null;
        ws.close();
        return;
      }
      failedWalks = 0;
      state.connects += 1;
      setStatus("ok", `live · ${state.url.replace(/^wss?:\/\//, "")}`);
      banner("");
      ws.send(P.packet(P.OP.HEARTBEAT, "{}"));
      heartbeat = setInterval(() => ws.send(P.packet(P.OP.HEARTBEAT, "{}")), HEARTBEAT_MS);
    } else if (p.op === P.OP.HEARTBEAT_REPLY) {
      const n = P.u32(p.body);
      if (n !== null) {
        state.online = n;
        el.online.textContent = `${n.toLocaleString()} watching`;
      }
    } else if (p.op === P.OP.MESSAGE) {
      // Decoding is async; chain it so messages render in wire order.
      decoding = decoding.then(async () => {
        if ((p.seq & P.HIGH_SEQ_BIT) === 0 && p.ver !== P.VER.PLAIN) state.seq = p.seq;
        for (const m of await P.messages(p)) render(m);
      }).catch((e) => console.warn("decode", e));
    }
  }

  function open(url) {
    state.url = url;
    setStatus("connecting", `connecting · ${url.replace(/^wss?:\/\//, "")}`);
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onopen = () => {
      const resume = state.epoch !== null && state.seq !== null ? { epoch: state.epoch, seq: state.seq } : null;
      ws.send(P.packet(P.OP.AUTH, P.authBody({ room: ROOM, token, buvid, resume })));
    };
    ws.onmessage = (ev) => {
      for (const p of P.split(ev.data)) onPacket(p, ws);
    };
    ws.onclose = () => {
      clearInterval(heartbeat);
      heartbeat = null;
      if (state.ws !== ws) return;
      state.ws = null;
      state.closes += 1;
      next();
    };
  }

  // The next host of host_list; after the whole list failed, discovery again, with backoff.
  async function next() {
    if (token && hostIndex + 1 < hosts.length) {
      hostIndex += 1;
      setStatus("connecting", `trying host ${hostIndex + 1}/${hosts.length}`);
      open(hosts[hostIndex]);
      return;
    }
    const wait = Math.min(BACKOFF_MS_MAX, 500 * 2 ** failedWalks);
    if (failedWalks > 0 || state.connects > 0) {
      setStatus("down", "reconnecting…");
    }
    if (failedWalks > 0) {
      banner(`Could not reach any edge (${hosts.length} tried). Retrying in ${Math.round(wait / 1000)} s…`);
    }
    failedWalks += 1;
    await new Promise((r) => setTimeout(r, failedWalks === 1 ? 0 : wait));
    try {
      await discover();
      open(hosts[0]);
    } catch (e) {
      setStatus("down", "control unreachable");
      banner(`Could not get a token and edges from control: ${e.message}. Retrying…`);
      setTimeout(next, wait);
    }
  }

  // ---- the demo send box ----------------------------------------------------------------

  if (body.dataset.demo === "on") {
    const form = $("send");
    const input = $("send-text");
    const note = $("send-note");
    form.classList.remove("hidden");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      note.textContent = "";
      try {
        const r = await fetch("/demo/send", {
          method: "POST", headers: { "content-type": "application/json" },
          body: JSON.stringify({ room: ROOM, text }),
        });
        if (r.ok) {
          input.value = "";
        } else {
          const j = await r.json().catch(() => ({}));
          note.textContent = j.error || j.message || `refused (${r.status})`;
        }
      } catch (e) {
        note.textContent = "control unreachable";
      }
    });
  }

  next();
})();
