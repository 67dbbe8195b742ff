import numpy as np
import pytest

from autopeft.searching.pareto import dominates, front_hypervolume, hypervolume, pareto_front


def row(score, params, mem):
    return {"score": score, "trainable_params": params, "peak_memory_bytes": mem}


def test_front_keeps_exactly_the_non_dominated_points():
    rows = [row(0.90, 100, 10), row(0.85, 50, 10), row(0.85, 60, 10),  # 2 dominated by 1
            row(0.80, 50, 5), row(0.70, 200, 20), row(0.90, 100, 10)]   # 4 dominated by 0; 5 ties 0
    assert sorted(pareto_front(rows)) == [0, 1, 3, 5]
    assert pareto_front(rows)[0] in (0, 5)  # best score first


def test_dominates_needs_one_strict_improvement():
    assert dominates([1, 1], [1, 2]) and not dominates([1, 1], [1, 1]) and not dominates([0, 2], [1, 1])


def test_hypervolume_exact_values():
    assert hypervolume(np.array([[0.5, 0.5, 0.5]]), [1, 1, 1]) == pytest.approx(0.125)
    # two boxes 0.5x1x1 and 1x0.5x1 overlapping in 0.5x0.5x1: union 0.75
    assert hypervolume(np.array([[0.5, 0, 0], [0, 0.5, 0]]), [1, 1, 1]) == pytest.approx(0.75)
    assert hypervolume(np.array([[1.5, 0, 0]]), [1, 1, 1]) == 0.0


def test_front_hypervolume_normalises_to_budget_and_memory():
    # score 0.8, half the budget, memory at 1/1.1 of the reference: 0.8 * 0.5 * (1 - 1/1.1)
    hv = front_hypervolume([row(0.8, 50, 100)], param_limit=100)
    assert hv == pytest.approx(0.8 * 0.5 * (1 - 1 / 1.1))
