"""tune's Dask path computes GridSearchCV's fits and ``cv_results_`` itself (mnist_dvc/cluster.py):
on a toy estimator, fast and without Dask, its results must be scikit-learn's own, so that a
change in scikit-learn fails here rather than in a user's cluster run."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from mnist_dvc import cluster


def test_the_cluster_fits_and_their_results_equal_gridsearchcv_on_a_toy_estimator():
    images, labels = load_iris(return_X_y=True)
    # Neighbour counts that tie on some folds: the ranks must tie as GridSearchCV's do.
    search = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": [1, 3, 5, 15, 40], "weights": ["uniform"]},
                          scoring="accuracy", cv=StratifiedKFold(3, shuffle=True, random_state=0))
    expected = search.fit(images, labels).cv_results_

    candidates, folds = cluster.grid_fits(search, images, labels)
    fits = [[cluster.fit_and_score(search.estimator, params, images, labels, train, test, "accuracy")
             for train, test in folds] for params in candidates]
    got = cluster.search_results(candidates, [[score for score, _ in row] for row in fits],
                                 [[seconds for _, seconds in row] for row in fits])

    assert got["params"] == expected["params"]
    for key in ["mean_test_score", "std_test_score", "rank_test_score", "split0_test_score",
                "split1_test_score", "split2_test_score"]:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert got[key].dtype == expected[key].dtype, key
    assert len(set(expected["rank_test_score"])) < len(candidates), "the grid should tie somewhere"
    assert got["mean_fit_time"].shape == expected["mean_fit_time"].shape
