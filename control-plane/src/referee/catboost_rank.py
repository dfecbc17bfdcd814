"""Trains official CatBoost on rows written by edgerec's `catboost_side_by_side`, with the
same parameters, and predicts the candidate rows. A referee for edgerec's own trainer.

usage: python catboost_rank.py PARAMS_JSON TRAIN_TSV VALIDATION_TSV CANDIDATES_TSV OUT_JSON
Each TSV line: label, group, then the feature columns (categorical ones as strings).
"""
import json
import sys
import time

from catboost import CatBoost, Pool

params_path, train_path, validation_path, candidates_path, out_path = sys.argv[1:6]
with open(params_path) as f:
    params = json.load(f)
cats = params.pop("cat_columns")


def pool(path):
    labels, groups, data = [], [], []
    with open(path) as f:
        for line in f:
            cells = line.rstrip("\n").split("\t")
            labels.append(float(cells[0]))
            groups.append(int(cells[1]))
            data.append([c if i in cats else float(c) for i, c in enumerate(cells[2:])])
    return Pool(data, labels, cat_features=cats, group_id=groups)


train, validation, candidates = pool(train_path), pool(validation_path), pool(candidates_path)
model = CatBoost(params)
started = time.perf_counter()
model.fit(train, eval_set=validation if validation.num_row() else None)
seconds = time.perf_counter() - started
raw = model.predict(candidates, prediction_type="RawFormulaVal")
with open(out_path, "w") as f:
    json.dump(
        {"seconds": seconds, "trees": model.tree_count_, "predictions": [float(v) for v in raw]},
        f,
    )
