// Runs requests through the browser build of the edge module (wasm-bindgen, `--target
// web`) in Node, for the native-parity test: node node-parity.mjs WEB_DIR BUNDLE
// REQUESTS.json OUT.json. Prints the median and p99 of a timed pass to stderr.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [webDir, bundlePath, requestsPath, outPath] = process.argv.slice(2);
const { initSync, Recommender } = await import(pathToFileURL(join(webDir, "edgerec.js")));
initSync({ module: readFileSync(join(webDir, "edgerec_bg.wasm")) });

const loadStarted = performance.now();
const recommender = new Recommender(readFileSync(bundlePath));
const loadMs = performance.now() - loadStarted;
const requests = JSON.parse(readFileSync(requestsPath, "utf8"));

const answers = requests.map((request) => {
  try {
    return { ok: recommender.recommend(request) };
  } catch (error) {
    return { error: { code: error.code, message: error.message } };
  }
});
writeFileSync(outPath, JSON.stringify(answers));

const times = [];
for (const request of requests) {
  const started = performance.now();
  try {
    recommender.recommend(request, () => performance.now());
  } catch {
    continue;
  }
  times.push(performance.now() - started);
}
times.sort((a, b) => a - b);
const at = (q) => times[Math.min(times.length - 1, Math.floor(q * times.length))];
console.error(
  `node: bundle load ${loadMs.toFixed(1)} ms; recommend median ${at(0.5).toFixed(3)} ms, p99 ${at(0.99).toFixed(3)} ms over ${times.length} requests`,
);
