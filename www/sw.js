// Offline support: the page, the module and bundles are kept after the first load.
// Bundles live at content-addressed keys and never change, so the cache answers first;
// the page's files and manifests go to the network first so updates show at once.
const CACHE = "edgerec-v1";
const PAGE = ["./", "index.html", "app.js", "style.css", "pkg/edgerec.js", "pkg/edgerec_bg.wasm"];

// The page's first load was not served through this worker: keep its files now. (The
// page itself keeps the manifest and bundle it loaded, see app.js.)
self.addEventListener("install", (event) =>
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(PAGE))
      .then(() => self.skipWaiting()),
  ),
);
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || new URL(request.url).origin !== location.origin) return;
  const immutable = new URL(request.url).pathname.includes("/bundles/");
  event.respondWith(immutable ? cacheFirst(request) : networkFirst(request));
});

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const cached = await cache.match(request);
  if (cached) return cached;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (error) {
    const cached = await cache.match(request, { ignoreSearch: true });
    if (cached) return cached;
    throw error;
  }
}
