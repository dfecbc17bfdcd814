// edgerec on Cloudflare Workers (and workerd): the raw-ABI edge module answers the host's
// REST API, `GET /recommendations/{user_id}` and `POST /recommendations`, with the same JSON
// as the wasmtime host. The module, the bundle and the viewers' profiles arrive as
// bindings (see README.md): EDGE_WASM is the compiled module (imported below), BUNDLE and
// PROFILES are ArrayBuffers (workerd `data` bindings) or, when absent, fetched from
// MANIFEST_URL (a channel manifest in the control plane's store or its CDN).
import { decode, encode } from "@msgpack/msgpack";
import edgeModule from "./edge.wasm";

const DEFAULT_RESULTS = 20;

class Refused extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The module instance, its bundle and the profiles: made once per isolate. */
let loaded = null;

class Edge {
  constructor(instance) {
    this.exports = instance.exports;
    // The ONNX runtime registers its operators in constructors: once, not per call.
    this.exports.__wasm_call_ctors();
  }

  output() {
    const { output_ptr, output_len, memory } = this.exports;
    return new Uint8Array(memory.buffer, output_ptr(), output_len()).slice();
  }

  /** Calls an export that takes one buffer; returns its output or throws its refusal. */
  call(name, bytes) {
    const { alloc, memory } = this.exports;
    const ptr = alloc(bytes.length);
    if (ptr === 0) throw new Refused(503, "out_of_memory", "the module could not allocate the input");
    new Uint8Array(memory.buffer, ptr, bytes.length).set(bytes);
    const status = this.exports[name](ptr, bytes.length);
    const output = decode(this.output());
    if (status !== 0) {
      const httpStatus = output.code === "invalid_request" ? 400 : output.code === "no_bundle" ? 503 : 500;
      throw new Refused(httpStatus, output.code, output.message);
    }
    return output;
  }
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function load(env) {
  const edge = new Edge(await WebAssembly.instantiate(edgeModule, {}));
  let bundle = env.BUNDLE && new Uint8Array(env.BUNDLE);
  let profiles = env.PROFILES && new Uint8Array(env.PROFILES);
  if (!bundle) {
    if (!env.MANIFEST_URL) throw new Error("configure a BUNDLE binding or MANIFEST_URL");
    const manifestUrl = new URL(env.MANIFEST_URL);
    const manifest = await (await fetch(manifestUrl)).json();
    // Keys are relative to the store's root, two levels above manifests/<channel>.json.
    const root = new URL("../", manifestUrl);
    bundle = await fetchBytes(new URL(manifest.bundle.key, root));
    if (manifest.profiles) profiles = await fetchBytes(new URL(manifest.profiles.key, root));
  }
  const summary = edge.call("load_bundle", bundle);
  const users = profiles ? decode(profiles).users ?? {} : {};
  return { edge, summary, users };
}

function json(body, status = 200, headers = {}) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function profileFeatures(profile) {
  return {
    country: profile.country ?? null,
    language: profile.language ?? null,
    age: profile.age ?? null,
    device: profile.device ?? null,
  };
}

function nowSeconds() {
  return Math.floor(Date.now() / 1000);
}

function serve(state, request) {
  const response = state.edge.call("recommend", encode(request));
  // Workers freeze the clock while a request computes, so stages cannot be timed here:
  // the module's stage times stay 0 (the host's come from its clock).
  response.metadata.request_id = crypto.randomUUID();
  return response;
}

const USER_PATH = /^\/recommendations\/([^/]+)$/;

async function getRecommendations(state, userText, params) {
  if (!/^\d+$/.test(userText) || BigInt(userText) > 18446744073709551615n) {
    throw new Refused(400, "invalid_request", `user_id ${JSON.stringify(userText)} is not an unsigned 64-bit integer`);
  }
  const user = Number(userText);
  if (!Number.isSafeInteger(user)) {
    // JavaScript numbers carry ids up to 2^53 exactly; the wasmtime host takes all of u64.
    throw new Refused(400, "invalid_request", `user_id ${userText} is above 2^53, which this worker cannot carry`);
  }
  for (const key of params.keys()) {
    if (key !== "n" && key !== "exclude_watched") {
      throw new Refused(400, "invalid_request", `unknown query parameter ${JSON.stringify(key)}`);
    }
  }
  const request = { user_id: user, n: DEFAULT_RESULTS, timestamp: nowSeconds() };
  if (params.has("n")) {
    const n = Number(params.get("n"));
    if (!Number.isInteger(n) || n < 0 || n > 4294967295) {
      throw new Refused(400, "invalid_request", `n ${JSON.stringify(params.get("n"))} is not an unsigned integer`);
    }
    request.n = n;
  }
  if (params.has("exclude_watched")) {
    const value = params.get("exclude_watched");
    if (value !== "true" && value !== "false") {
      throw new Refused(400, "invalid_request", "exclude_watched must be true or false");
    }
    request.exclude_watched = value === "true";
  }
  const profile = state.users[String(user)];
  if (profile) {
    request.user_features = profileFeatures(profile);
    request.watch_history = profile.history ?? [];
  }
  return json(serve(state, request));
}

async function postRecommendations(state, httpRequest) {
  let request;
  try {
    request = await httpRequest.json();
  } catch (error) {
    throw new Refused(400, "invalid_request", `the body is not JSON: ${error.message}`);
  }
  if (request === null || typeof request !== "object" || Array.isArray(request)) {
    throw new Refused(400, "invalid_request", "the body must be a JSON object");
  }
  request.timestamp ??= nowSeconds();
  // The stored profile fills in what the caller did not send.
  const profile = Number.isSafeInteger(request.user_id) ? state.users[String(request.user_id)] : undefined;
  if (profile) {
    request.user_features ??= profileFeatures(profile);
    request.watch_history ??= profile.history ?? [];
  }
  return json(serve(state, request));
}

export default {
  async fetch(httpRequest, env) {
    try {
      // A failed load is retried by the next request instead of being kept.
      loaded ??= load(env).catch((error) => {
        loaded = null;
        throw error;
      });
      const state = await loaded;
      const url = new URL(httpRequest.url);
      const user = url.pathname.match(USER_PATH);
      if (user && httpRequest.method === "GET") {
        return await getRecommendations(state, decodeURIComponent(user[1]), url.searchParams);
      }
      if (url.pathname === "/recommendations" && httpRequest.method === "POST") {
        return await postRecommendations(state, httpRequest);
      }
      if (url.pathname === "/health" && httpRequest.method === "GET") {
        return json({ status: "ok", model_version: state.summary.model_version, bundle: state.summary });
      }
      return json({ code: "not_found", message: `no route for ${httpRequest.method} ${url.pathname}` }, 404);
    } catch (error) {
      if (error instanceof Refused) return json({ code: error.code, message: error.message }, error.status);
      return json({ code: "internal", message: error.message }, 500);
    }
  },
};
