// The in-browser demo: the browser build of the edge module re-ranks in this tab from a
// history kept in localStorage; nothing about the viewer leaves the device unless sharing
// is switched on. Served by the control plane at /demo/ beside its store (/store/).
import init, { Recommender } from "./pkg/edgerec.js";

const params = new URLSearchParams(location.search);
// The store's root: the control plane's /store/ by default, or a CDN in front of it.
const STORE = new URL(params.get("store") ?? "../store/", location.href);
const CHANNEL = params.get("channel") ?? "production";
const RESULTS = 12;
const HISTORY_KEY = "edgerec.history.v1";
const SHARING_KEY = "edgerec.sharing.v1";
const VIEWER_KEY = "edgerec.viewer.v1";
// The module refuses more than 10,000 history ids; the recent past is what matters.
const HISTORY_LIMIT = 500;

const $ = (id) => document.getElementById(id);
const page = {
  ready: null,
  firstRecommendationsMs: null,
  rerankMs: [],
  lastResponse: null,
};
window.edgerec = page;

function loadJson(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

let history = loadJson(HISTORY_KEY, []);
let recommender = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchOk(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  return response;
}

// Keeps a response for the offline worker (sw.js), whose cache the first load missed.
async function keep(url, response) {
  if (!("caches" in window)) return;
  try {
    await (await caches.open("edgerec-v1")).put(url, response);
  } catch (error) {
    console.warn("not cached for offline use:", error.message);
  }
}

async function loadBundle() {
  const manifestUrl = new URL(`manifests/${CHANNEL}.json`, STORE);
  const manifestResponse = await fetchOk(manifestUrl, { cache: "no-cache" });
  await keep(manifestUrl, manifestResponse.clone());
  const manifest = await manifestResponse.json();
  const bundleUrl = new URL(manifest.bundle.key, STORE);
  const bundleResponse = await fetchOk(bundleUrl);
  await keep(bundleUrl, bundleResponse.clone());
  const bytes = new Uint8Array(await bundleResponse.arrayBuffer());
  const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
  if (digest !== manifest.bundle.sha256) {
    throw new Error(`the bundle's sha256 is ${digest}, the manifest says ${manifest.bundle.sha256}`);
  }
  return new Recommender(bytes);
}

function minutes(seconds) {
  if (!seconds) return "length unknown";
  const m = Math.floor(seconds / 60);
  return `${m}:${String(seconds % 60).padStart(2, "0")}`;
}

function reason(source) {
  if (source === "personalized") return "Picked for you from your history";
  if (source.startsWith("category:")) return `Because you watch ${source.slice("category:".length)}`;
  if (source === "promoted") return "Promoted";
  return "Popular right now";
}

function request() {
  const engaged = history.filter((h) => h.action !== "skip").map((h) => h.video_id);
  const skipped = history.filter((h) => h.action === "skip").map((h) => h.video_id);
  return {
    n: RESULTS,
    timestamp: Math.floor(Date.now() / 1000),
    watch_history: engaged,
    excluded_video_ids: skipped,
  };
}

function rerank() {
  const started = performance.now();
  const response = recommender.recommend(request(), () => performance.now());
  const ms = performance.now() - started;
  page.rerankMs.push(ms);
  page.lastResponse = response;
  render(response, ms);
}

function render(response, ms) {
  const grid = $("recommendations");
  const template = $("card");
  grid.replaceChildren(
    ...response.recommendations.map((item) => {
      const card = template.content.firstElementChild.cloneNode(true);
      const video = recommender.video(item.video_id);
      card.dataset.videoId = item.video_id;
      card.dataset.category = item.category;
      card.dataset.source = item.source;
      card.querySelector(".title").textContent = item.title;
      card.querySelector(".category").textContent = item.category;
      card.querySelector(".channel").textContent = `channel ${item.channel_id}`;
      card.querySelector(".duration").textContent = minutes(video?.duration_seconds ?? 0);
      card.querySelector(".reason").textContent = reason(item.source);
      for (const button of card.querySelectorAll("button")) {
        button.addEventListener("click", () => act(item.video_id, button.dataset.action));
      }
      return card;
    }),
  );
  const meta = response.metadata;
  $("model-version").textContent = meta.model_version;
  $("rerank-ms").textContent = `${ms.toFixed(2)} ms`;
  $("stage-ms").textContent = Object.entries(meta.stage_ms)
    .map(([stage, t]) => `${stage} ${t.toFixed(2)}`)
    .join(" · ");
  $("candidates").textContent = `${meta.candidates_retrieved} retrieved, ${meta.candidates_after_filtering} after filters${meta.cold_start ? " (cold start: popular)" : ""}`;
  if (page.firstRecommendationsMs === null) {
    page.firstRecommendationsMs = performance.now();
    $("first-ms").textContent = `${page.firstRecommendationsMs.toFixed(0)} ms after navigation`;
  }
}

function renderHistory() {
  $("history").replaceChildren(
    ...history
      .slice(-15)
      .reverse()
      .map((h) => {
        const li = document.createElement("li");
        const video = recommender.video(h.video_id);
        li.textContent = `${h.action}: ${video?.title ?? `video ${h.video_id}`}`;
        return li;
      }),
  );
}

function renderBrowse() {
  const category = $("category").value;
  $("browse").replaceChildren(
    ...recommender.browse(category, 30).map((video) => {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.videoId = video.video_id;
      row.dataset.category = video.category;
      const title = document.createElement("span");
      title.textContent = video.title;
      const watch = document.createElement("button");
      watch.type = "button";
      watch.dataset.action = "watch";
      watch.textContent = "Watch";
      watch.addEventListener("click", () => act(video.video_id, "watch"));
      row.append(title, watch);
      return row;
    }),
  );
}

function viewerId() {
  let id = Number(localStorage.getItem(VIEWER_KEY));
  if (!Number.isSafeInteger(id) || id <= 0) {
    id = crypto.getRandomValues(new Uint32Array(1))[0] + 1;
    localStorage.setItem(VIEWER_KEY, String(id));
  }
  return id;
}

async function share(videoId, action) {
  const sharing = loadJson(SHARING_KEY, { on: false, url: "" });
  if (!sharing.on || !sharing.url) return;
  // A skip is a showing without engagement: the host's `impression`.
  const kind = { watch: "watch", like: "like", skip: "impression" }[action];
  try {
    const response = await fetch(new URL("interactions", sharing.url.replace(/\/?$/, "/")), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        user_id: viewerId(),
        video_id: videoId,
        type: kind,
        timestamp: Math.floor(Date.now() / 1000),
        // The demo has no player: a watch is the whole video.
        ...(kind === "watch" ? { watch_seconds: recommender.video(videoId)?.duration_seconds ?? 0 } : {}),
      }),
    });
    if (!response.ok) showError(`The host refused the interaction: ${response.status} ${await response.text()}`);
  } catch (error) {
    showError(`Could not reach the host at ${sharing.url}: ${error.message}`);
  }
}

function act(videoId, action) {
  history = history.filter((h) => h.video_id !== videoId);
  history.push({ video_id: videoId, action, at: Date.now() });
  history = history.slice(-HISTORY_LIMIT);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(history));
  share(videoId, action);
  rerank();
  renderHistory();
}

function setUpControls() {
  const select = $("category");
  select.replaceChildren(
    ...recommender.categories().map((c) => {
      const option = document.createElement("option");
      option.value = option.textContent = c;
      return option;
    }),
  );
  select.addEventListener("change", renderBrowse);
  $("reset").addEventListener("click", () => {
    history = [];
    localStorage.removeItem(HISTORY_KEY);
    rerank();
    renderHistory();
  });
  const sharing = loadJson(SHARING_KEY, { on: false, url: "" });
  $("share").checked = sharing.on;
  $("host-url").value = sharing.url;
  const save = () =>
    localStorage.setItem(SHARING_KEY, JSON.stringify({ on: $("share").checked, url: $("host-url").value.trim() }));
  $("share").addEventListener("change", save);
  $("host-url").addEventListener("change", save);
}

async function start() {
  if ("serviceWorker" in navigator) {
    // Offline after the first load: the worker keeps the page, the module and the bundle.
    navigator.serviceWorker.register("sw.js").catch((error) => console.warn("no offline cache:", error.message));
  }
  await init();
  recommender = await loadBundle();
  page.recommender = recommender;
  page.rerank = rerank;
  setUpControls();
  rerank();
  renderHistory();
  renderBrowse();
}

page.ready = start().catch((error) => {
  showError(`The recommender could not start: ${error.message}`);
  throw error;
});
