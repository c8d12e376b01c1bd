// qserve's dashboard. Asks GET /api/dashboard every second and shows what it says: the server's
// figures, and for each queue its depth, its in/out rates (computed here from two successive
// counters and the document's `time`) as a uPlot chart of the last minutes, its groups and its
// consumers. The token (when the server asks for one: a 401) is asked once and kept in this tab's
// sessionStorage; it goes in the Authorization header, as the API takes it.
"use strict";

(() => {
  const DATA = "/api/dashboard";
  const EVERY_MS = 1000;          // between the end of one request and the next
  const KEEP_SECONDS = 300;       // history the charts show
  const TOKEN_KEY = "qserve.dashboard.token";
  const COLORS = { depth: "#3563c9", in: "#1f9d55", out: "#d9731a" };

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let updates = 0;
  let lastServer = null;          // the previous document's server figures and time
  const cards = new Map();        // "service/queue" -> card

  // -- formatting ------------------------------------------------------------------------------
  const integer = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
  const rate = (r) => (r == null ? "–" : r >= 100 ? integer(r) : r.toFixed(1));
  function duration(seconds) {
    if (seconds == null) return "–";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    const s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24,
      m = Math.floor(s / 60) % 60;
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    return `${m} min ${s % 60} s`;
  }
  function bytes(n) {
    if (n == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }
  // per second between two readings; null without a previous one or across a counter reset
  function perSecond(now, before, seconds) {
    if (before == null || now == null || !(seconds > 0) || now < before) return null;
    return (now - before) / seconds;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  // -- the token ---------------------------------------------------------------------------------
  function askToken(problem) {
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = problem;
    setState("token needed", "warn");
    $("token").focus();
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    $("login").hidden = true;
    poll();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    $("forget").hidden = true;
    askToken("");
  });

  function setState(text, kind) {
    const badge = $("state");
    badge.textContent = text;
    badge.className = `badge ${kind}`;
  }

  // -- the loop ----------------------------------------------------------------------------------
  async function poll() {
    let response;
    try {
      response = await fetch(DATA, { headers: token ? { Authorization: token } : {}, cache: "no-store" });
    } catch (err) {
      setState("server unreachable", "bad");
      return setTimeout(poll, EVERY_MS);
    }
    if (response.status === 401) return askToken(token ? "The server refused that token." : "");
    if (!response.ok) {
      setState(`${response.status}: ${(await response.text()).trim()}`, "bad");
      return setTimeout(poll, EVERY_MS);
    }
    render(await response.json());
    setTimeout(poll, EVERY_MS);
  }

  function render(doc) {
    $("login").hidden = true;
    $("main").hidden = false;
    $("forget").hidden = !token;
    const server = doc.server;
    if (server.ready) setState("ready", "good");
    else setState(`not ready: ${server.not_ready}`, "bad");
    $("updated").textContent = `updated ${new Date(doc.time * 1000).toLocaleTimeString()}`;
    renderServer(doc.time, server);
    const seen = new Set();
    for (const queue of doc.queues) {
      const key = `${queue.service}/${queue.queue}`;
      seen.add(key);
      let card = cards.get(key);
      if (!card) {
        card = makeCard(queue);
        cards.set(key, card);
        placeCard(card, queue);
      }
      updateCard(card, queue, doc.time);
    }
    for (const [key, card] of cards) {
      if (!seen.has(key)) { card.chart?.destroy(); card.root.remove(); cards.delete(key); }
    }
    const queues = doc.queues.filter((q) => q.queue !== "dlq").length;
    $("queue-count").textContent = `(${queues})`;
    $("no-queues").hidden = queues > 0;
    $("no-dlq").hidden = doc.queues.length > queues;
    updates += 1;
    document.body.dataset.updates = String(updates);   // the browser test waits on it
  }

  // -- the server --------------------------------------------------------------------------------
  function renderServer(time, s) {
    const before = lastServer;
    const seconds = before ? time - before.time : null;
    const cpu = before ? perSecond(s.cpu_seconds, before.cpu_seconds, seconds) : null;
    const puts = before ? s.put_count - before.put_count : 0;
    const putMean = puts > 0 ? (s.put_seconds - before.put_seconds) / puts : null;
    if (!before || seconds > 0) lastServer = { time, ...s };
    const tiles = [
      ["status", "Status", s.ready ? "ready" : `not ready: ${s.not_ready}`],
      ["uptime", "Uptime", duration(s.uptime)],
      ["connections", "Connections", integer(s.connections)],
      ["websockets", "WebSockets", integer(s.websockets)],
      ["watch-sessions", "Watchers", integer(s.watch_sessions)],
      ["requests-rate", "Requests /s", rate(before ? perSecond(s.requests, before.requests, seconds) : null)],
      ["put-latency", "Put latency (mean)", putMean == null ? "–" : duration(putMean)],
      ["cpu", "CPU", cpu == null ? "–" : `${(cpu * 100).toFixed(0)} %`],
      ["rss", "Memory (RSS)", bytes(s.rss_bytes)],
      ["open-fds", "Open files", integer(s.open_fds)],
      ["backend", "Backend", s.backend],
      ["version", "Version", s.version],
    ];
    if (s.storage_problem) tiles.splice(1, 0, ["storage", "Storage", s.storage_problem]);
    $("server").replaceChildren(...tiles.map(([field, label, value]) =>
      el("div", { class: field === "status" ? `tile ${s.ready ? "good" : "bad"}` : "tile" },
        el("dt", { text: label }), el("dd", { "data-field": field, text: value }))));
  }

  // -- a queue -----------------------------------------------------------------------------------
  const FIGURES = [
    ["length", "Depth"], ["in-rate", "In /s"], ["out-rate", "Out /s"], ["pending", "Pending"],
    ["consumers", "Consumers"], ["indexes", "Indexes"], ["disk", "On disk"],
  ];

  function makeCard(queue) {
    const fields = {};
    const figures = el("dl", { class: "figures" }, ...FIGURES.map(([field, label]) => {
      fields[field] = el("dd", { "data-field": field });
      return el("div", { class: `figure ${field}` }, el("dt", { text: label }), fields[field]);
    }));
    const chartBox = el("div", { class: "chart" });
    const groups = el("tbody");
    const consumers = el("tbody");
    const fenced = el("p", { class: "error fenced", hidden: "" });
    const root = el("article", { class: "queue", "data-queue": `${queue.service}/${queue.queue}` },
      el("header", {},
        el("h3", {}, queue.service, " ", el("span", { class: `kind ${queue.queue}`, text: queue.queue })),
        el("code", { text: queue.path })),
      fenced, figures,
      el("div", { class: "body" }, chartBox,
        el("div", { class: "tables" },
          table("Groups", ["Group", "Consumers", "Pending", "Delivered", "Cursor"], groups),
          table("Consumers", ["Consumer", "Status", "Window", "Pending", "Idle", "Commit"], consumers))));
    return { root, fields, chartBox, groups, consumers, fenced, chart: null, series: [[], [], [], []], last: null };
  }

  function table(title, headings, body) {
    return el("div", { class: "table" }, el("h4", { text: title }),
      el("div", { class: "scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", { text: h })))), body)));
  }

  function placeCard(card, queue) {
    const parent = queue.queue === "dlq" ? $("dlq") : $("queues");
    const key = (q) => `${q.dataset.queue}`;
    const mine = `${queue.service}/${queue.queue}`;
    const after = [...parent.children].find((other) => key(other) > mine);
    parent.insertBefore(card.root, after ?? null);
  }

  function updateCard(card, queue, time) {
    const f = card.fields;
    card.fenced.hidden = !queue.fenced;
    card.fenced.textContent = queue.fenced ? `fenced: ${queue.fenced}` : "";
    const counters = queue.counters;
    const last = card.last;
    const seconds = last ? time - last.time : null;
    let inRate = null, outRate = null;
    if (last && seconds > 0) {
      inRate = perSecond(counters.puts, last.counters.puts, seconds);
      outRate = perSecond(counters.deliveries + counters.gets, last.counters.deliveries + last.counters.gets, seconds);
    }
    if (!last || seconds > 0) {
      card.last = { time, counters, inRate, outRate };
      if (!queue.fenced) addPoint(card, time, queue.length, inRate, outRate);
    } else {   // the same reading again (a snapshot the server reused): keep the rates shown
      inRate = last.inRate;
      outRate = last.outRate;
    }
    f.length.textContent = queue.fenced ? "–" : integer(queue.length);
    f["in-rate"].textContent = rate(inRate);
    f["out-rate"].textContent = rate(outRate);
    f.pending.textContent = integer(queue.pending);
    f.consumers.textContent = integer(queue.consumers);
    f.indexes.textContent = queue.last_index ? `${integer(queue.first_index)} – ${integer(queue.last_index)}` : "none";
    f.disk.textContent = queue.bytes == null ? "–"
      : `${bytes(queue.bytes)} in ${queue.segments} segment${queue.segments === 1 ? "" : "s"}`;
    f.disk.parentElement.hidden = queue.bytes == null;

    card.groups.replaceChildren(...(queue.groups.length ? queue.groups.map((g) =>
      el("tr", { "data-group": g.name },
        el("td", { text: g.name }), el("td", { text: integer(g.consumers) }), el("td", { text: integer(g.pending) }),
        el("td", { text: integer(g.delivered) }), el("td", { text: integer(g.index) })))
      : [empty(5, "No consumer groups.")]));
    card.consumers.replaceChildren(...(queue.consumer_list.length ? queue.consumer_list.map((c) =>
      el("tr", { "data-consumer": c.id, class: c.pending > 0 && c.idle > 60 ? "stale" : "" },
        el("td", { text: c.id }), el("td", { text: c.status }), el("td", { text: integer(c.window) }),
        el("td", { text: integer(c.pending) }), el("td", { text: duration(c.idle) }),
        el("td", { text: c.auto_commit ? "auto" : "manual" })))
      : [empty(6, "No consumers attached.")]));
  }

  function empty(columns, text) {
    return el("tr", { class: "empty" }, el("td", { colspan: String(columns), text }));
  }

  // -- a queue's chart ---------------------------------------------------------------------------
  function addPoint(card, time, depth, inRate, outRate) {
    const [times, depths, ins, outs] = card.series;
    times.push(time); depths.push(depth); ins.push(inRate); outs.push(outRate);
    while (times.length && times[0] < time - KEEP_SECONDS) {
      times.shift(); depths.shift(); ins.shift(); outs.shift();
    }
    if (!card.chart) card.chart = makeChart(card);
    else card.chart.setData(card.series);
  }

  function makeChart(card) {
    const fromZero = (u, min, max) => [0, max > 0 ? max * 1.15 : 1];
    const chart = new uPlot({
      width: Math.max(card.chartBox.clientWidth, 200),
      height: 190,
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
      scales: { x: { time: true }, depth: { range: fromZero }, rate: { range: fromZero } },
      series: [
        {},
        { label: "depth", scale: "depth", stroke: COLORS.depth, width: 2, fill: "rgba(53, 99, 201, 0.08)",
          value: (u, v) => integer(v) },
        { label: "in /s", scale: "rate", stroke: COLORS.in, width: 2, value: (u, v) => rate(v) },
        { label: "out /s", scale: "rate", stroke: COLORS.out, width: 2, dash: [6, 4], value: (u, v) => rate(v) },
      ],
      axes: [
        { stroke: "#666", grid: { stroke: "#eee" } },
        { scale: "depth", stroke: COLORS.depth, grid: { stroke: "#eee" }, size: 56 },
        { scale: "rate", side: 1, stroke: "#555", grid: { show: false }, size: 48 },
      ],
    }, card.series, card.chartBox);
    new ResizeObserver(() => {
      chart.setSize({ width: Math.max(card.chartBox.clientWidth, 200), height: 190 });
    }).observe(card.chartBox);
    return chart;
  }

  poll();
})();
