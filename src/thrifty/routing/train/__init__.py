"""Training and offline evaluation of thrifty's router from labelled, recorded model replies."""

from thrifty.routing.train.cost import CostModel, load_prices
from thrifty.routing.train.data import Call, Row, load_rows, split_rows
from thrifty.routing.train.extract import answer_key, extract_answer, normalise
from thrifty.routing.train.fit import train
from thrifty.routing.train.metrics import PairMetrics, Summary, pair_metrics, random_at_cost, summarise
from thrifty.routing.train.policy import CascadePolicy, Outcome, run_oracle, run_policy, run_single
from thrifty.routing.train.router import Gate, Router
from thrifty.routing.train.step import Accept, CallModel, Draft, Step, replay

__all__ = [
    "Accept",
    "Call",
    "CallModel",
    "CascadePolicy",
    "CostModel",
    "Draft",
    "Gate",
    "Outcome",
    "PairMetrics",
    "Router",
    "Row",
    "Step",
    "Summary",
    "answer_key",
    "extract_answer",
    "load_prices",
    "load_rows",
    "normalise",
    "pair_metrics",
    "random_at_cost",
    "replay",
    "run_oracle",
    "run_policy",
    "run_single",
    "split_rows",
    "summarise",
    "train",
]
