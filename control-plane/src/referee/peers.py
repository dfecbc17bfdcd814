"""The native peers of edgerec's serving stages, timed on the inputs that
`control-plane bench peers` wrote: official CatBoost's applier, onnxruntime and
hnswlib, one thread each (as the edge module runs). Never part of the product.

usage: python peers.py DIR   (reads DIR/manifest.json, writes DIR/peers.json)
"""
import json
import os
import sys
import time

import numpy as np


def latency(samples):
    """Median and p99 (nearest rank) in microseconds, as control-plane's Latency."""
    ordered = sorted(samples)
    n = len(ordered)

    def at(q):
        rank = min(max(int(np.ceil(q * n)), 1), n)
        return ordered[rank - 1] * 1e6

    return {"median_us": at(0.5), "p99_us": at(0.99)}


def timed(call, repeats):
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def ranker(root, spec):
    from catboost import CatBoost, Pool

    model = CatBoost()
    model.load_model(os.path.join(root, spec["model"]), format="json")
    cats = spec["cat_columns"]
    rows = []
    with open(os.path.join(root, spec["rows"])) as f:
        for line in f:
            cells = line.rstrip("\n").split("\t")
            rows.append([c if i in cats else float(c) for i, c in enumerate(cells)])
    # The pool is built once: our evaluator, too, takes categories hashed beforehand.
    pool = Pool(rows, cat_features=cats)
    raw = model.predict(pool, prediction_type="RawFormulaVal", thread_count=1)
    ours = np.array(spec["our_predictions"])
    # A call from Python costs hundreds of microseconds before any tree is evaluated
    # (measured below on one row), as much as the work itself. So the applier is timed
    # on REPEATS copies of the rows per call, and each call's time divided by REPEATS:
    # its cost for one request's rows with the crossing spread thin.
    repeats = 50
    batch = Pool(rows * repeats, cat_features=cats)
    samples = timed(
        lambda: model.predict(batch, prediction_type="RawFormulaVal", thread_count=1),
        max(spec["calls"] // repeats, 20),
    )
    one_row = Pool(rows[:1], cat_features=cats)
    floor = timed(
        lambda: model.predict(one_row, prediction_type="RawFormulaVal", thread_count=1),
        200,
    )
    return {
        "latency": latency([t / repeats for t in samples]),
        "call_floor_us": latency(floor)["median_us"],
        "max_abs_difference": float(np.max(np.abs(raw - ours))),
    }


def tower(root, spec):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        os.path.join(root, spec["model"]),
        options,
        providers=["CPUExecutionProvider"],
    )
    arrays = {}
    for name, tensor in spec["inputs"].items():
        data = np.fromfile(os.path.join(root, tensor["file"]), dtype=tensor["dtype"])
        arrays[name] = data.reshape(tensor["shape"])
    requests = spec["requests"]
    feeds = [
        {name: array[r : r + 1] for name, array in arrays.items()} for r in range(requests)
    ]
    outputs = np.concatenate([session.run(None, feed)[0] for feed in feeds])
    ours = np.fromfile(os.path.join(root, spec["our_embeddings"]), dtype="<f4")
    samples = []
    for feed in feeds:
        started = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - started)
    return {
        "latency": latency(samples),
        "call_floor_us": identity_run_us(ort, options),
        "max_abs_difference": float(np.max(np.abs(outputs.reshape(-1) - ours))),
    }


def identity_run_us(ort, options):
    """The median time of onnxruntime's run() from Python on a one-node Identity model:
    the per-call crossing that the tower's time includes and a native caller would not
    pay."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"x": np.zeros((1, 1), dtype=np.float32)}
    return latency(timed(lambda: session.run(None, feed), 2000))["median_us"]


def shard(root, spec):
    import hnswlib

    dim = spec["dim"]
    vectors = np.fromfile(os.path.join(root, spec["vectors"]), dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(os.path.join(root, spec["queries"]), dtype="<f4").reshape(-1, dim)
    exact = np.fromfile(os.path.join(root, spec["exact"]), dtype="<u4").reshape(-1, spec["k"])
    index = hnswlib.Index(space="ip", dim=dim)
    # Built in the first round, read back in the next ones (ours is built once, too).
    saved = os.path.join(root, "hnswlib.bin")
    if os.path.exists(saved):
        index.load_index(saved, max_elements=len(vectors))
        with open(saved + ".seconds") as f:
            build_seconds = float(f.read())
    else:
        started = time.perf_counter()
        index.init_index(
            max_elements=len(vectors),
            M=spec["m"],
            ef_construction=spec["ef_construction"],
            random_seed=42,
        )
        index.set_num_threads(spec["build_threads"])
        index.add_items(vectors, np.arange(len(vectors)))
        build_seconds = time.perf_counter() - started
        index.save_index(saved)
        with open(saved + ".seconds", "w") as f:
            f.write(repr(build_seconds))
    index.set_num_threads(1)
    k = spec["k"]
    rows = []
    for ef in spec["efs"]:
        index.set_ef(ef)
        samples = []
        found = 0
        for query, truth in zip(queries, exact):
            started = time.perf_counter()
            labels, _ = index.knn_query(query[None, :], k=k)
            samples.append(time.perf_counter() - started)
            found += len(set(labels[0].tolist()) & set(truth.tolist()))
        rows.append(
            {"ef": ef, "latency": latency(samples), "recall": found / (k * len(queries))}
        )
    # The per-call crossing: a one-point index, one result.
    tiny = hnswlib.Index(space="ip", dim=dim)
    tiny.init_index(max_elements=1, M=spec["m"])
    tiny.add_items(vectors[:1], np.arange(1))
    tiny.set_num_threads(1)
    floor = timed(lambda: tiny.knn_query(queries[:1], k=1), 2000)
    return {
        "build_seconds": build_seconds,
        "searches": rows,
        "call_floor_us": latency(floor)["median_us"],
    }


def main():
    root = sys.argv[1]
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    report = {}
    for part, run in (("ranker", ranker), ("tower", tower), ("shard", shard)):
        if part in manifest:
            print(f"peers: {part} ...", file=sys.stderr, flush=True)
            report[part] = run(root, manifest[part])
    from importlib.metadata import version

    report["versions"] = {
        name: version(name) for name in ("catboost", "onnxruntime", "hnswlib", "numpy")
    }
    with open(os.path.join(root, "peers.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
