// The operator console: polls control's console JSON (behind the API key) every few seconds.
// Read-only except the notice form and the drain button (which asks first).
"use strict";

(() => {
  const POLL_MS = 2000;
  const POINTS_MAX = 90;
  const COLORS = ["#fb7299", "#23ade5", "#f5a524", "#3ecf8e", "#b48cff", "#f25f5c", "#8b90a3"];
  const $ = (id) => document.getElementById(id);

  // The key comes from #key=... (never sent to a server, never logged) or this tab's storage.
  let key = sessionStorage.getItem("barrage.key");
  function keyFromHash() {
    const k = new URLSearchParams(location.hash.slice(1)).get("key");
    if (!k) return false;
    key = k;
    sessionStorage.setItem("barrage.key", key);
    history.replaceState(null, "", location.pathname);
    return true;
  }
  keyFromHash();
  // Following a /console#key=... link from an open console changes only the fragment.
  window.addEventListener("hashchange", () => keyFromHash() && poll());

  function setStatus(kind, text) {
    $("status").className = "status " + kind;
    $("status").textContent = text;
  }

  async function api(path, init = {}) {
    const r = await fetch(path, {
      ...init, cache: "no-store",
      headers: { ...(init.headers || {}), authorization: `Bearer ${key}`, "content-type": "application/json" },
    });
    const j = await r.json().catch(() => ({}));
    if (r.status === 401) throw Object.assign(new Error(j.error || "unauthorized"), { locked: true });
    if (!r.ok) throw new Error(j.error || j.message || `HTTP ${r.status}`);
    return j;
  }

  function lock(note) {
    key = null;
    sessionStorage.removeItem("barrage.key");
    $("app").classList.add("hidden");
    $("logout").classList.add("hidden");
    $("login").classList.remove("hidden");
    $("login-note").textContent = note || "";
    setStatus("connecting", "locked");
  }

  // ---- charts: a canvas line chart of the last POINTS_MAX samples -----------------------

  const series = { sends: [], drops: {} };
  function draw(canvas, lines) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    canvas.width = w * dpr; canvas.height = h * dpr;
    const g = canvas.getContext("2d");
    g.scale(dpr, dpr);
    g.clearRect(0, 0, w, h);
    const max = Math.max(1, ...lines.flatMap((l) => l.points));
    g.strokeStyle = "rgba(255,255,255,0.06)";
    g.lineWidth = 1;
    for (let i = 1; i < 4; i++) {
      g.beginPath(); g.moveTo(0, (h * i) / 4); g.lineTo(w, (h * i) / 4); g.stroke();
    }
    g.fillStyle = "#8b90a3"; g.font = "11px system-ui";
    g.fillText(fmt(max), 4, 12);
    for (const l of lines) {
      if (!l.points.length) continue;
      g.strokeStyle = l.color; g.lineWidth = 2; g.beginPath();
      l.points.forEach((v, i) => {
        // Stretch to the full width until the window is full, then scroll.
        const slots = Math.max(2, Math.min(POINTS_MAX, l.points.length));
        const x = w - 4 - (l.points.length - 1 - i) * ((w - 8) / (slots - 1));
        const y = h - 4 - (v / max) * (h - 18);
        i ? g.lineTo(x, y) : g.moveTo(x, y);
      });
      g.stroke();
      // The newest point as a dot, so a single sample shows too.
      const v = l.points[l.points.length - 1];
      g.fillStyle = l.color;
      g.beginPath();
      g.arc(w - 4, h - 4 - (v / max) * (h - 18), 3, 0, 2 * Math.PI);
      g.fill();
    }
  }
  function fmt(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
    return n >= 10 || n === 0 ? Math.round(n).toString() : n.toFixed(1);
  }
  function push(arr, v) {
    arr.push(v);
    if (arr.length > POINTS_MAX) arr.shift();
  }

  let last = null;
  function onStats(s) {
    if (last && s.at_ms > last.at_ms) {
      const dt = (s.at_ms - last.at_ms) / 1000;
      const rate = Math.max(0, (s.sends_total - last.sends_total) / dt);
      push(series.sends, rate);
      $("rate-now").textContent = fmt(rate);
      $("rate-now").dataset.value = String(rate);
      $("rate-now").dataset.points = String(series.sends.length);
      let dropSum = 0;
      const reasons = new Set([...Object.keys(s.drops), ...Object.keys(series.drops)]);
      for (const r of reasons) {
        const d = Math.max(0, ((s.drops[r] || 0) - (last.drops[r] || 0)) / dt);
        dropSum += d;
        series.drops[r] = series.drops[r] || [];
        push(series.drops[r], d);
      }
      $("drops-now").textContent = fmt(dropSum);
    }
    last = s;
    draw($("chart-sends"), [{ color: COLORS[1], points: series.sends }]);
    // Only reasons that dropped something in the window: a quiet fleet has a quiet chart.
    const names = Object.keys(series.drops).filter((n) => series.drops[n].some((v) => v > 0)).sort();
    draw($("chart-drops"), names.map((n, i) => ({ color: COLORS[i % COLORS.length], points: series.drops[n] })));
    if (!names.length) {
      $("drops-legend").textContent = "no drops in the last 3 minutes";
      return;
    }
    $("drops-legend").replaceChildren(...names.map((n, i) => {
      const s = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = COLORS[i % COLORS.length];
      s.append(sw, n);
      return s;
    }));
  }

  // ---- edges ----------------------------------------------------------------------------

  function cell(tr, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    tr.appendChild(td);
    return td;
  }
  function onEdges(j) {
    const rows = j.edges.map((e) => {
      const tr = document.createElement("tr");
      tr.dataset.node = e.node_id;
      cell(tr, e.node_id);
      cell(tr, e.peer ? `${e.region} (via ${e.peer})` : e.region);
      const st = document.createElement("span");
      st.className = "state state-" + e.state;
      st.textContent = e.state;
      cell(tr, st);
      const used = e.capacity ? e.connections / e.capacity : 0;
      const bar = document.createElement("span");
      bar.className = "load";
      const fill = document.createElement("i");
      fill.style.width = Math.min(100, used * 100).toFixed(1) + "%";
      bar.appendChild(fill);
      const load = document.createElement("span");
      load.append(bar, (used * 100).toFixed(1) + "%");
      cell(tr, load);
      cell(tr, e.connections.toLocaleString());
      cell(tr, e.capacity.toLocaleString());
      const a = e.admin;
      cell(tr, a ? (a.reachable ? `${a.links_up}/${a.links} up` : "admin unreachable") : "–");
      cell(tr, a && a.reachable ? String(a.rooms) : "–");
      cell(tr, `${(e.last_seen_ms_ago / 1000).toFixed(1)} s ago`);
      const b = document.createElement("button");
      b.className = "ghost";
      b.type = "button";
      b.textContent = "Drain…";
      b.disabled = !a || e.state === "draining" || e.state === "dead";
      b.onclick = () => confirmDrain(e.node_id);
      cell(tr, b);
      return tr;
    });
    $("edges").replaceChildren(...rows);
    $("edges-note").textContent = `${j.edges.length} known`;
  }

  // ---- busiest rooms --------------------------------------------------------------------

  function onRooms(j) {
    const total = j.rooms.reduce((n, r) => n + r.viewers, 0);
    const rows = j.rooms.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.room = String(r.room);
      cell(tr, String(r.room));
      cell(tr, r.viewers.toLocaleString());
      const share = total ? r.viewers / total : 0;
      const bar = document.createElement("span");
      bar.className = "load";
      const fill = document.createElement("i");
      fill.style.width = (share * 100).toFixed(1) + "%";
      bar.appendChild(fill);
      cell(tr, bar);
      const a = document.createElement("a");
      a.href = `/room/${r.room}`;
      a.textContent = "watch";
      cell(tr, a);
      return tr;
    });
    $("rooms").replaceChildren(...rows);
    $("rooms-note").textContent = j.rooms.length
      ? `top ${j.rooms.length}, ${total.toLocaleString()} viewers`
      : "no room has viewers";
  }

  function confirmDrain(node) {
    $("modal-node").textContent = node;
    $("modal").classList.remove("hidden");
    $("modal-no").onclick = () => $("modal").classList.add("hidden");
    $("modal-yes").onclick = async () => {
      $("modal").classList.add("hidden");
      try {
        await api("/console/api/drain", { method: "POST", body: JSON.stringify({ node_id: node }) });
        $("edges-note").textContent = `${node}: draining`;
      } catch (e) {
        $("edges-note").textContent = `drain failed: ${e.message}`;
      }
    };
  }

  // ---- the loop -------------------------------------------------------------------------

  async function poll() {
    if (!key) return;
    try {
      const [edges, stats] = await Promise.all([api("/console/api/edges"), api("/console/api/stats")]);
      onEdges(edges);
      onStats(stats);
      // Rooms come from the broker: a console without one still shows the rest.
      api("/console/api/rooms").then(onRooms, (e) => { $("rooms-note").textContent = `rooms: ${e.message}`; });
      setStatus("ok", `live · every ${POLL_MS / 1000} s`);
      $("login").classList.add("hidden");
      $("app").classList.remove("hidden");
      $("logout").classList.remove("hidden");
    } catch (e) {
      if (e.locked) return lock("That key was refused.");
      setStatus("down", e.message);
    }
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem("barrage.key", key);
    poll();
  });
  $("logout").onclick = () => lock("");
  $("push").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const note = $("push-note");
    try {
      const r = await api("/console/api/push", {
        method: "POST",
        body: JSON.stringify({ scope: f.scope.value, room: Number(f.room.value), text: f.text.value }),
      });
      note.textContent = `pushed, msg_id ${r.msg_id}`;
      f.text.value = "";
    } catch (e) {
      note.textContent = `refused: ${e.message}`;
    }
  });

  if (key) poll(); else lock("");
  setInterval(poll, POLL_MS);
})();
