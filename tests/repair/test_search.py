"""`fire_repair.search`: a repair's clean costs on the clean reference set."""
import torch

from fire_repair.search import clean_costs


def test_clean_costs_count_flips_and_weigh_them_by_the_unrepaired_probabilities():
    ref_prob = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    ref_pred = ref_prob.argmax(1)
    changed, drop = clean_costs(torch.tensor([1, 1, 1]), ref_pred, ref_prob)
    assert changed.tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(drop, torch.tensor([0.8, 0.0, 0.0]))
