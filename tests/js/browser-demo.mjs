// Drives the browser demo in headless Chromium (playwright-core): node browser-demo.mjs
// URL SCREENSHOT.png [HOST_URL] (with a host, sharing is switched on for one watch). Needs EDGEREC_NODE_MODULES and EDGEREC_CHROMIUM. Prints one JSON
// object of observations; the Rust test asserts on them. Exits non-zero on any console
// error or page error.
import { createRequire } from "node:module";
import { join } from "node:path";

const [url, screenshot, hostUrl] = process.argv.slice(2);
const require = createRequire(join(process.env.EDGEREC_NODE_MODULES, "noop.js"));
const { chromium } = require("playwright-core");

const browser = await chromium.launch({
  executablePath: process.env.EDGEREC_CHROMIUM,
  // The machine's network is closed: without these Chromium retries Google's hosts.
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const problems = [];
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console error: ${message.text()}`);
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));

  await page.goto(url);
  await page.evaluate(() => window.edgerec.ready);
  await page.waitForSelector("#recommendations .card");
  const firstRecommendationsMs = await page.evaluate(() => window.edgerec.firstRecommendationsMs);
  const cardCategories = () =>
    page.$$eval("#recommendations .card", (cards) => cards.map((c) => c.dataset.category));
  const before = await cardCategories();

  // The category the first recommendations show least of, among those with videos to watch.
  const options = await page.$$eval("#category option", (os) => os.map((o) => o.value));
  const count = (list, c) => list.filter((x) => x === c).length;
  const target = options.reduce((best, c) => (count(before, c) < count(before, best) ? c : best), options[0]);
  const catalogueShare = await page.evaluate(
    (c) => window.edgerec.recommender.browse(c, 1e9).length / window.edgerec.recommender.summary().videos,
    target,
  );

  await page.selectOption("#category", target);
  const watched = [];
  for (let i = 0; i < 6; i++) {
    const row = page.locator("#browse .row").nth(i);
    watched.push(Number(await row.getAttribute("data-video-id")));
    await row.locator('button[data-action="watch"]').click();
  }
  const after = await cardCategories();

  // A skip removes the video; a like keeps the page answering.
  const firstCard = page.locator("#recommendations .card").first();
  const skipped = Number(await firstCard.getAttribute("data-video-id"));
  await firstCard.locator('button[data-action="skip"]').click();
  await page.locator("#recommendations .card").first().locator('button[data-action="like"]').click();
  const afterSkip = await page.$$eval("#recommendations .card", (cards) => cards.map((c) => Number(c.dataset.videoId)));

  // Re-rank timing: 50 more re-ranks of the same history.
  const rerankMs = await page.evaluate(() => {
    for (let i = 0; i < 50; i++) window.edgerec.rerank();
    return window.edgerec.rerankMs;
  });
  const sorted = [...rerankMs].sort((a, b) => a - b);
  const modelVersion = await page.textContent("#model-version");
  await page.screenshot({ path: screenshot, fullPage: true });

  // Sharing, off until now: one watch goes to the host's /interactions (another origin).
  let sharedStatus = null;
  let viewer = null;
  if (hostUrl) {
    await page.check("#share");
    await page.fill("#host-url", hostUrl);
    await page.dispatchEvent("#host-url", "change");
    const shared = page.waitForResponse(
      (r) => r.url().endsWith("/interactions") && r.request().method() === "POST",
    );
    await page.locator("#recommendations .card").first().locator('button[data-action="watch"]').click();
    sharedStatus = (await shared).status();
    viewer = Number(await page.evaluate(() => localStorage.getItem("edgerec.viewer.v1")));
  }

  // Offline after the first load: the worker's cache serves page, module and bundle, and
  // the history is still there.
  await page.evaluate(() => navigator.serviceWorker.ready);
  await context.setOffline(true);
  await page.reload();
  await page.evaluate(() => window.edgerec.ready);
  const offline = await cardCategories();
  const historyLength = await page.$$eval("#history li", (items) => items.length);
  await context.setOffline(false);

  console.log(
    JSON.stringify({
      firstRecommendationsMs,
      target,
      catalogueShare,
      before,
      after,
      watched,
      skipped,
      afterSkip,
      rerankP50Ms: sorted[Math.floor(sorted.length / 2)],
      rerankP99Ms: sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))],
      reranks: sorted.length,
      modelVersion,
      offline,
      historyLength,
      sharedStatus,
      viewer,
      problems,
    }),
  );
} finally {
  await browser.close();
}
if (problems.length > 0) {
  console.error(problems.join("\n"));
  process.exit(1);
}
