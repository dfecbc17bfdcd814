"""Trains a CatBoost model with float and categorical features, saves it as JSON, and
writes 10,000 fresh rows with CatBoost's raw predictions. Referee for edge::ranker.

usage: python catboost_train.py OUT_DIR
"""
import sys
import numpy as np
from catboost import CatBoostClassifier, Pool

out = sys.argv[1]
rng = np.random.RandomState(7)
colors = ["red", "green", "blue"]
cities = [f"city_{i}" for i in range(100)]


def rows(n, unseen):
    data, labels = [], []
    for _ in range(n):
        f0 = rng.randn()
        f1 = rng.randn() if rng.rand() > 0.1 else float("nan")
        f2 = rng.rand() * 100
        color = colors[rng.randint(3)]
        city = cities[rng.randint(100)] if not (unseen and rng.rand() < 0.05) else f"nowhere_{rng.randint(9)}"
        logit = f0 + (0.8 if color == "red" else -0.3) + (sum(map(ord, city)) % 7 - 3) * 0.2 + (0 if f1 != f1 else f1 * 0.5) + f2 * 0.01
        data.append([f0, color, f1, city, f2])
        labels.append(int(logit + rng.randn() > 0))
    return data, labels


train, labels = rows(5000, unseen=False)
model = CatBoostClassifier(
    iterations=200, depth=6, learning_rate=0.1, one_hot_max_size=4,
    random_seed=0, thread_count=1, verbose=False,
)
model.fit(Pool(train, labels, cat_features=[1, 3]))
model.save_model(f"{out}/model.json", format="json")
test, _ = rows(10000, unseen=True)
raw = model.predict(Pool(test, cat_features=[1, 3]), prediction_type="RawFormulaVal")
with open(f"{out}/rows.tsv", "w") as f:
    for row, value in zip(test, raw):
        f.write("\t".join(repr(v) if isinstance(v, float) else v for v in row))
        f.write("\t" + repr(float(value)) + "\n")
