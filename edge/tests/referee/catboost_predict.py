"""Loads a CatBoost JSON model written by edge::ranker into official CatBoost and writes
its raw predictions for the rows given. Referee for edge::ranker's writer.

usage: python catboost_predict.py MODEL_JSON ROWS_TSV CAT_COLUMNS OUT
(CAT_COLUMNS: comma-separated column indices; other columns are floats, "nan" allowed)
"""
import sys
from catboost import CatBoost, Pool

model_path, rows_path, cat_columns, out = sys.argv[1:5]
cats = [int(c) for c in cat_columns.split(",") if c]
model = CatBoost()
model.load_model(model_path, format="json")
data = []
with open(rows_path) as f:
    for line in f:
        cells = line.rstrip("\n").split("\t")
        data.append([c if i in cats else float(c) for i, c in enumerate(cells)])
raw = model.predict(Pool(data, cat_features=cats), prediction_type="RawFormulaVal")
with open(out, "w") as f:
    for value in raw:
        f.write(repr(float(value)) + "\n")
