"""The learners: P(engagement) and P(unsubscribe) per channel and local hour, with Thompson sampling.

P(engagement) is a Bayesian probit regression (the online "assumed density filtering"
update of Graepel et al., *Web-scale Bayesian click-through rate prediction*, ICML
2010): each weight has a Gaussian posterior (mean, variance), so the model knows what
it does not know. P(unsubscribe) is a :class:`FatigueHazard`: Beta-Bernoulli counts per
channel and recent load (sends in the last 7 days), so the risk of messaging a customer
who was left alone stays visible however often the rest were messaged. (A probit
regression over the same features as engagement still learns unsubscribes alongside,
but it is not used for scoring: with rare positives it predicted the pooled rate
whatever the load, and the learners stopped sending on large populations.)

- **scoring** draws one weight vector from the engagement posterior per decision
  (Thompson sampling) and values every candidate at
  ``click_value * P(engagement) - unsubscribe_cost * P(unsubscribe)``; a candidate worth
  nothing is not sent. Unseen campaigns, channels and variants have wide posteriors,
  so they are tried (cold start explores, it is not starved) until the data says no;
- **the preferred hour** (:class:`HourPreference`): each customer's preferred local hour
  is a discrete posterior over 24 hours whose prior is the population's click-rate curve
  by hour for the customer's trait values; it enters the engagement score as a known
  offset, and the population's curves are drawn for Thompson sampling;
- **learning** is one closed-form update per label: engagement is positive when a
  click (or conversion) joined by ``decision_id`` arrives, negative when the
  configurable horizon passes without one; unsubscribe likewise.

Features (see :class:`FeatureLayout`): per channel, the customer's traits (hashed),
fatigue (sends in the last 1/7/30 days), recency of their last click; the local
hour-of-week (daily harmonics and a weekend flag) crossed with traits; the customer's
own smoothed click rate on the channel and how close the hour is to the hours they
usually click at; campaign and campaign-channel biases; variant biases crossed with
traits (the contextual bandit over a campaign's template variants).

river is used for what it does well here: :class:`ProbitClassifier` follows river's
``Classifier`` contract for one-off use, and the recent quality of each model is a
rolling ``river.metrics`` ROC AUC (``RollingROCAUC``) and log loss. (river 0.26.1's ``LogisticRegression``
has no posterior to sample, ``bandit.ThompsonSampling`` fails on its first pull with
default settings and ``LinUCBDisjoint`` is slow, so scoring is vectorised numpy, with its
hot parts compiled by numba where that is loaded: :mod:`cadence.engine.valuation`.)
"""

from __future__ import annotations

import heapq
import math
import random
import re
import zlib
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from river import base, metrics, utils
from scipy.special import erfcinv, ndtr, ndtri  # type: ignore[import-untyped]

from cadence.channels import CHANNELS, Feedback
from cadence.engine import valuation
from cadence.engine.campaign import DAY_MS, HOUR_MS, Campaign, ChannelPolicy, TemplateSpec
from cadence.engine.decide import BulkScores, GroupBests, OptionGroup, group_bests
from cadence.engine.decision import Candidate
from cadence.engine.slots import local_datetime, local_ms, zone_named

__all__ = [
    "DECISION_TIME_FIELDS",
    "DecisionLearner",
    "FatigueHazard",
    "FeatureLayout",
    "HourPreference",
    "IDENTIFYING_TRAITS",
    "LearnerConfig",
    "ProbitClassifier",
    "ProbitModel",
    "identifying_value",
    "learned_differences",
]

TRAIT_BUCKETS = 64
#: Traits that name one person (Segment's reserved identify traits that do, and their snake_case
#: spellings): a value nobody else shares teaches nothing about anyone else, and hashed into a
#: trait bucket it lands on another trait's weights (``device=mobile``'s, say). Not features,
#: nor is any text value shaped like one (:func:`identifying_value`). In the simulator, an email
#: address and a phone number among the traits cost 8 points of the oracle's clicks (session 28).
IDENTIFYING_TRAITS = frozenset(
    {
        "address",
        "anonymousId",
        "anonymous_id",
        "avatar",
        "birthday",
        "createdAt",
        "created_at",
        "description",
        "email",
        "firstName",
        "first_name",
        "id",
        "lastName",
        "last_name",
        "name",
        "phone",
        "userId",
        "user_id",
        "username",
        "website",
    }
)
CAMPAIGN_BUCKETS = 64
ARM_BUCKETS = 32
N_CHANNELS = len(CHANNELS)
CHANNEL_INDEX = {c: i for i, c in enumerate(CHANNELS)}
TWO_PI = 2 * math.pi
Effect = tuple[np.ndarray, int]
#: Per group: channel, campaign and campaign-channel weight index, variant bucket (-1: none),
#: campaign number; then the number of campaigns and whether any group has a variant.
#: Then where each campaign's groups start when they are consecutive (None otherwise), and last
#: each group's draw of the customer's channel effect, as an index into the unsubscribe noise.
_GroupStruct = tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, bool, np.ndarray | None, np.ndarray
]


class _ScoreInputs(NamedTuple):
    """What :meth:`DecisionLearner._score` hands to the computation of the score's parts (numpy or compiled)."""

    stats: CustomerStats
    traits: Mapping[str, Any]
    b: np.ndarray  # the customer vector
    t1: np.ndarray  # bias and trait buckets
    harm: np.ndarray  # the send times' features (times x 27), and squared
    harm_sq: np.ndarray
    hours: np.ndarray  # fractional and whole local hours of the send times
    whole: np.ndarray
    rate_exp: np.ndarray  # the customer's own click rate and experience per channel
    match_angle: float  # the customer's mean click hour as an angle, and the hour match's weight
    match_scale: float
    struct: _GroupStruct
    noise_e: np.ndarray  # the posterior draw's normals
    noise_u: np.ndarray


#: Trait buckets by the traits' items (profiles repeat; hashing the values costs more than the lookup).
_TRAIT_CACHE: dict[tuple[tuple[str, Any, type], ...], list[int]] = {}

#: Text trait values that name one person or moment: an email address; a phone number
#: (international, North American, or 7 digits and more); a URL; a date or time; a hex id.
_IDENTIFYING_VALUE = re.compile(
    r"[^@\s]+@[^@\s]+"
    r"|\+\d[\d\s().\-]{6,}|\d{7,}|\(?\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}"
    r"|https?://.*|\d{4}-\d\d-\d\d.*|\d{1,2}[./]\d{1,2}[./]\d{4}.*|[0-9a-fA-F\-]{16,}",
    re.DOTALL,
)


def identifying_value(value: str) -> bool:
    """Whether a text trait's value looks like it names one person or moment (not a feature).

    >>> [identifying_value(v) for v in ["a@b.test", "+1 (555) 010-2030", "555-010-2030", "2026-11-28", "11/28/2026"]]
    [True, True, True, True, True]
    >>> [identifying_value(v) for v in ["18-29", "10000-50000", "1990-1999", "2026-01", "4.12.10", "Europe/Berlin"]]
    [False, False, False, False, False, False]
    >>> identifying_value("3f2b8c1e-0d9a-4c57-9e61-1f0a2b3c4d5e"), identifying_value("x" * 65)
    (True, True)
    """
    return len(value) > 64 or _IDENTIFYING_VALUE.fullmatch(value) is not None


@lru_cache(maxsize=65536)
def _bucket(text: str, n: int) -> int:
    return zlib.crc32(text.encode()) % n


class FeatureLayout:
    """Where each feature lives in the weight vector; blocks never overlap.

    >>> layout = FeatureLayout()
    >>> layout.size == layout.arm + ARM_BUCKETS * layout.n_traits1
    True
    """

    n_customer = 1 + TRAIT_BUCKETS + 5  # bias, traits, fatigue 1/7/30d, recency, never clicked
    n_time = 27  # one-hot hour of day, cos h, sin h, weekend
    n_traits1 = 1 + TRAIT_BUCKETS
    n_personal = 3  # own click rate on channel, hour match, experience on channel

    def __init__(self) -> None:
        self.channel = 0
        self.time = self.channel + N_CHANNELS * self.n_customer
        self.personal = self.time + self.n_time * self.n_traits1
        self.campaign = self.personal + self.n_personal
        self.campaign_channel = self.campaign + CAMPAIGN_BUCKETS
        self.arm = self.campaign_channel + CAMPAIGN_BUCKETS
        self.size = self.arm + ARM_BUCKETS * self.n_traits1

    def prior_variance(self, crossed: float = 0.02) -> np.ndarray:
        """Prior variance per weight: wide on biases, ``crossed`` on the many crossed features."""
        var = np.full(self.size, crossed)
        for c in range(N_CHANNELS):
            var[self.channel + c * self.n_customer] = 0.3  # channel bias
            fatigue = self.channel + c * self.n_customer + 1 + TRAIT_BUCKETS
            var[fatigue : fatigue + 5] = 0.1
        var[self.personal : self.personal + self.n_personal] = 0.2
        var[self.campaign : self.arm] = 0.1
        return var


@dataclass(frozen=True)
class LearnerConfig:
    """How the learners value and learn.

    ``click_value`` and ``unsubscribe_cost`` are in the same unit (say, clicks): a send
    is worth ``click_value * P(engagement) - unsubscribe_cost * P(unsubscribe)``.
    ``horizon_ms``: how long after a send a missing click counts as no engagement.

    The defaults are what a server runs (``cadence serve``; operators change the main ones
    with the ``CADENCE_LEARNER__*`` settings, see :class:`cadence.settings.LearnerSettings`)
    and what the simulator benchmark measures, apart from its 24 h horizon.
    """

    click_value: float = 1.0
    unsubscribe_cost: float = 10.0
    horizon_ms: int = 48 * HOUR_MS
    engagement_prior: float = 0.03
    unsubscribe_prior: float = 0.002
    beta: float = 1.0
    engagement_events: frozenset[Feedback] = frozenset({Feedback.CLICKED, Feedback.CONVERTED})
    quality_window: int = 5000
    explore_unsubscribe: bool = False  # sample the risk too (False: value risk at its posterior mean)
    hazard_strength: float = 300.0  # prior weight (in sends) of each fatigue-hazard cell
    hazard_load_slope: float = 0.3  # prior: each recent send raises the unsubscribe risk by this share
    explore_volume: bool = False  # True: a lucky draw may also send when the posterior mean says no
    customer_channel_var: float = 0.1  # prior variance of a customer's own per-channel engagement effect
    crossed_prior_var: float = 0.02  # prior variance of the trait and hour x trait weights
    hour_model: bool = True  # each customer's preferred hour as a discrete posterior (HourPreference)
    hour_width: float = 2.5  # hours: how fast engagement falls away from the preferred hour
    hour_floor: float = 0.2  # engagement far from the preferred hour, as a share of the peak
    hour_offset_scale: float = 0.5  # probit units per unit of log hour lift (~ dz/dlog p near p = 0.05)
    hour_prior_power: float = 1.0  # sharpens the population's hour curve into the prior over preferred hours
    hour_pop_strength: float = 20.0  # pseudo-sends pulling each trait's hour curve towards its overall rate
    hour_miss_weight: float = 0.0  # weight of a send not clicked in a customer's hour likelihood
    #: Weight of the customer's opens in their hour likelihood (:meth:`HourPreference.open_loglik`):
    #: an open says when the customer reads, and an email is opened several times as often as it is
    #: clicked. Opens a mail client's privacy proxy made (``properties.machine_open``) are not
    #: learned. 0: the hour is learned from clicks alone.
    hour_open_weight: float = 1.0
    hour_pop_draw: bool = True  # draw the population's hour curves (Thompson at the population level)
    hour_draw_scale: float = 0.35  # shrinks that draw's spread (the trait rows share their sends)
    hour_explore: bool = False  # draw the preferred hour from its posterior (False: use the expected lift)
    probit_hours: bool = True  # the probit's own hour x trait weights and hour match (besides HourPreference)
    #: The probit's hour x trait block includes a one-hot hour of day (False: only the smooth daily
    #: cycle, cos and sin of the hour, and the weekend flag, per trait).
    hour_onehot: bool = True
    #: Value the one-hot hour weights partially pooled (learning stays on the raw weights): each
    #: trait row's 24 weights as a shared level plus hour deviations, the level taking
    #: ``hour_pool_share`` of each weight's prior variance, so an hour never sent at is valued at
    #: the level the hours that were sent at took up, not at the prior's 0
    #: (:meth:`DecisionLearner._pooled_time_block`). Off: no gain shown in the simulator (session 15,
    #: docs/measurements.md).
    hour_pool: bool = False
    hour_pool_share: float = 0.75
    time_draw: bool = False  # draw the hour x trait weights too (False: their posterior mean)
    hazard_fit: bool = True  # FittedHazard (shared load slope and timing term) instead of cells per load
    #: Send when the value is positive with the customer's effect this many sd up (the probit
    #: customer model's effect; the gamma model sends on its posterior mean).
    volume_optimism: float = 0.25
    #: The optimism shrinks with the customer's recent load: ``volume_optimism / (1 + this * load)``
    #: (load = sends in the last 7 days): a hopeful extra send is cheap to a rested customer, and
    #: the risk it buys grows with every message the customer got lately.
    volume_optimism_load: float = 0.0
    #: Learn each send provisionally this long after it (no click by then: a no), and correct
    #: a click or unsubscribe that arrives later, within ``horizon_ms``, by learning it then (the
    #: "fake negative" treatment of delayed feedback). None: every label waits for the horizon.
    label_delay_ms: int | None = 6 * HOUR_MS
    #: How a customer's own per-channel engagement is learned: "probit" (a random effect in the
    #: regression, prior variance ``customer_channel_var``) or "gamma" (a Gamma-Poisson rate
    #: multiplier per channel: clicks against the population model's expected clicks, prior shape
    #: ``customer_gamma_shape``; the regression then learns the population with it as an offset).
    customer_model: str = "probit"
    customer_gamma_shape: float = 2.5
    #: Trait names that are not features (the default: :data:`IDENTIFYING_TRAITS`).
    ignored_traits: frozenset[str] = IDENTIFYING_TRAITS

    def __post_init__(self) -> None:
        # Given as a list (settings, JSON): kept as a set, which a config (a cache key) must be.
        object.__setattr__(self, "ignored_traits", frozenset(self.ignored_traits))


#: The :class:`LearnerConfig` fields read only when options are valued: a stored learner can
#: take new values of these (:meth:`DecisionLearner.reconfigure`). Every other field shapes
#: what the learner learned (priors, labels, the models' structure).
DECISION_TIME_FIELDS = frozenset(
    {
        "click_value",
        "unsubscribe_cost",
        "volume_optimism",
        "volume_optimism_load",
        "explore_unsubscribe",
        "explore_volume",
        "hour_explore",
        "hour_pop_draw",
        "hour_draw_scale",
        "hour_pool",
        "hour_pool_share",
        "time_draw",
    }
)


def learned_differences(stored: LearnerConfig, wanted: LearnerConfig) -> list[str]:
    """The fields that shape learning where ``stored`` (say, a snapshot's) and ``wanted`` differ.

    A config unpickled from an older snapshot reads a field it lacks as the class default.

    >>> learned_differences(LearnerConfig(), LearnerConfig(unsubscribe_cost=3.0))
    []
    >>> learned_differences(LearnerConfig(), LearnerConfig(horizon_ms=HOUR_MS, hazard_fit=False))
    ['horizon_ms', 'hazard_fit']
    """
    return [
        f.name
        for f in fields(LearnerConfig)
        if f.name not in DECISION_TIME_FIELDS and getattr(stored, f.name) != getattr(wanted, f.name)
    ]


class ProbitModel:
    """Bayesian probit regression with a diagonal Gaussian posterior, updated one label at a time.

    >>> m = ProbitModel(size=3, prior_mean=np.zeros(3), prior_var=np.ones(3))
    >>> idx, val = np.array([0, 2]), np.array([1.0, 1.0])
    >>> before = m.predict(idx, val)
    >>> for _ in range(20):
    ...     m.learn(idx, val, True)
    >>> m.sample(np.zeros(3)).tolist() == m.mean.tolist()
    True
    >>> m.predict(idx, val) > before
    True
    """

    def __init__(
        self, *, size: int, prior_mean: np.ndarray, prior_var: np.ndarray, beta: float = 1.0
    ) -> None:
        self.mean = prior_mean.astype(float).copy()
        self.var = prior_var.astype(float).copy()
        self.prior_var = prior_var.astype(float).copy()
        self.beta = beta
        self.n = 0

    def predict(
        self, idx: np.ndarray, val: np.ndarray, extra: Effect | None = None, offset: float = 0.0
    ) -> float:
        """Posterior predictive probability of a positive label.

        ``extra`` is one more weight with feature value 1 kept outside the vector (a
        customer's own effect): ``(array of shape (2, n) holding means and variances, column)``.
        ``offset`` is a known term added to the score (the hour preference's).
        """
        s = float(self.mean[idx] @ val) + offset
        v2 = float(self.var[idx] @ (val * val))
        if extra is not None:
            s += float(extra[0][0, extra[1]])
            v2 += float(extra[0][1, extra[1]])
        return float(ndtr(s / math.sqrt(self.beta**2 + v2)))

    def learn(
        self, idx: np.ndarray, val: np.ndarray, label: bool, extra: Effect | None = None, offset: float = 0.0
    ) -> None:
        """One assumed-density-filtering update for one labelled example (``extra``, ``offset`` as in predict)."""
        y = 1.0 if label else -1.0
        var = self.var[idx]
        s = float(self.mean[idx] @ val) + offset
        v2 = float(var @ (val * val))
        if extra is not None:
            s += float(extra[0][0, extra[1]])
            v2 += float(extra[0][1, extra[1]])
        total2 = self.beta**2 + v2
        total = math.sqrt(total2)
        t = y * s / total
        cdf = max(float(ndtr(t)), 1e-12)
        v = math.exp(-0.5 * t * t) / math.sqrt(TWO_PI) / cdf
        w = v * (v + t)
        self.mean[idx] = self.mean[idx] + y * val * var / total * v
        self.var[idx] = var * np.maximum(1.0 - val * val * var / total2 * w, 1e-4)
        sd = getattr(self, "_sd", None)
        if sd is not None:
            sd[idx] = np.sqrt(self.var[idx])
        if extra is not None:
            eff, col = extra
            ev = float(eff[1, col])
            eff[0, col] += y * ev / total * v
            eff[1, col] = ev * max(1.0 - ev / total2 * w, 1e-4)
        self.n += 1

    def sd(self) -> np.ndarray:
        """The posterior standard deviations (kept up to date by :meth:`learn`; do not modify)."""
        sd: np.ndarray | None = getattr(self, "_sd", None)
        if sd is None:
            sd = self._sd = np.sqrt(self.var)
        return sd

    def sample(self, noise: np.ndarray) -> np.ndarray:
        """One weight vector drawn from the posterior (Thompson sampling), given standard normal ``noise``."""
        return np.asarray(self.mean + np.sqrt(self.var) * noise, dtype=float)


class ProbitClassifier(base.Classifier):
    """:class:`ProbitModel` over dict features, following river's classifier contract.

    >>> clf = ProbitClassifier()
    >>> for _ in range(30):
    ...     clf.learn_one({"email": 1.0}, True)
    ...     clf.learn_one({"sms": 1.0}, False)
    >>> clf.predict_proba_one({"email": 1.0})[True] > clf.predict_proba_one({"sms": 1.0})[True]
    True
    """

    def __init__(self, size: int = 1024, prior_var: float = 1.0) -> None:
        self.size = size
        self.prior_var = prior_var
        self._model = ProbitModel(size=size, prior_mean=np.zeros(size), prior_var=np.full(size, prior_var))

    def _encode(self, x: Mapping[Hashable, Any]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.array([_bucket(str(k), self.size) for k in x], dtype=np.int64)
        return idx, np.array([float(v) for v in x.values()])

    def learn_one(self, x: dict[Hashable, Any], y: Any) -> None:  # noqa: D102 (river's contract)
        self._model.learn(*self._encode(x), bool(y))

    def predict_proba_one(  # noqa: D102 (river's contract)
        self, x: dict[Hashable, Any], **kwargs: Any
    ) -> dict[bool | str | int, float]:
        p = self._model.predict(*self._encode(x))
        return {False: 1.0 - p, True: p}


class FatigueHazard:
    """P(unsubscribe) per channel and recent load (sends in the last 7 days), as Beta-Bernoulli counts.

    The unsubscribe risk of a message depends above all on how many messages the customer
    got lately; a regression over hundreds of features sees too few unsubscribes to learn
    that, and once daily sends have pushed the pooled rate up it predicts that rate whatever
    the load. Here every (channel, load) cell keeps its own count of sends and unsubscribes,
    so the risk after a quiet week stays visible and cheap to learn. The prior of cell ``k``
    is ``prior * (1 + slope * k)`` with the weight of ``strength`` sends; the estimate is
    made non-decreasing in the load (more messages never lower the risk).

    >>> h = FatigueHazard(prior=0.002, strength=100, slope=0.3)
    >>> for _ in range(2000):
    ...     h.learn(0, 0, False)
    ...     h.learn(0, 6, False)
    >>> for _ in range(40):
    ...     h.learn(0, 6, True)
    >>> bool(h.rates()[0, 0] < 0.002 < h.rates()[0, 6])
    True
    """

    loads = 8  # 0..6 sends in the last 7 days, and 7 or more

    def __init__(self, *, prior: float, strength: float, slope: float) -> None:
        k = np.arange(self.loads)
        self.prior = np.tile(prior * (1 + slope * k), (N_CHANNELS, 1))
        self.strength = strength
        self.sends = np.zeros((N_CHANNELS, self.loads))
        self.unsubscribes = np.zeros((N_CHANNELS, self.loads))
        self._rates: np.ndarray | None = None

    def bucket(self, load: int) -> int:
        """The cell of a load."""
        return min(max(load, 0), self.loads - 1)

    def learn(self, channel: int, load: int, unsubscribed: bool, fit: float = 0.0) -> None:
        """Count one labelled send (``unsubscribed`` or not) on ``channel`` at ``load`` (``fit`` unused here)."""
        k = self.bucket(load)
        self.sends[channel, k] += 1
        if unsubscribed:
            self.unsubscribes[channel, k] += 1
        self._rates = None

    def late_unsubscribe(self, channel: int, load: int, fit: float = 0.0) -> None:
        """A send already counted as kept turned out to be an unsubscribe: count it, not the send again."""
        self.unsubscribes[channel, self.bucket(load)] += 1
        self._rates = None

    def rates(self) -> np.ndarray:
        """Posterior mean risk per (channel, load cell), non-decreasing in load."""
        if self._rates is None:
            raw = (self.unsubscribes + self.strength * self.prior) / (self.sends + self.strength)
            self._rates = np.maximum.accumulate(raw, axis=1)
        return self._rates


class FittedHazard(FatigueHazard):
    """P(unsubscribe) as ``r[channel] * (1 + s * load) * exp(g * fit)``, fitted to the same counts.

    :class:`FatigueHazard` estimates each (channel, load) cell on its own and then takes the
    running maximum over the loads; with a few unsubscribes per cell the maximum of noisy
    cells runs high (an upward bias growing with the load). Here the cells share three kinds
    of parameter: a base rate per channel, one load slope ``s`` and one timing coefficient
    ``g`` for ``fit``, the log of the hour preference's expected engagement lift of the send
    (0 for a send at an average hour; a message sent at an hour that suits the customer
    badly tends to be an unwelcome one). ``(s, g)`` has a discrete posterior over a grid
    (priors: ``log(0.1 + s)`` around that of ``slope``, ``g`` around 0); each channel's rate is its Gamma
    posterior mean given ``(s, g)``. Each (channel, load) cell is then shrunk towards that
    curve with the weight of ``strength`` sends (and kept non-decreasing in the load), so a
    risk the straight line misses still shows where the cell has the data. Refitted when
    the labels have grown by 1% (or 20 labels).

    >>> h = FittedHazard(prior=0.002, strength=100, slope=0.3)
    >>> for _ in range(3000):
    ...     h.learn(0, 0, False)
    ...     h.learn(0, 6, False, fit=-0.5)
    >>> for _ in range(30):
    ...     h.learn(0, 6, True, fit=-0.5)
    >>> r = h.rates()
    >>> bool(r[0, 0] < r[0, 3] < r[0, 6]), bool(h.timing_factor(0.5) < 1 < h.timing_factor(-0.5))
    (True, True)
    """

    slopes = np.array([0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 6.5, 8.0])
    timings = np.linspace(-1.5, 1.5, 13)
    #: Bin edges and centres of ``fit`` (log lift) for the counts.
    edges = np.array([-0.45, -0.15, 0.15, 0.45])
    centres = np.array([-0.6, -0.3, 0.0, 0.3, 0.6])

    def __init__(self, *, prior: float, strength: float, slope: float) -> None:
        super().__init__(prior=prior, strength=strength, slope=slope)
        self.base_prior = prior
        self.slope_prior = slope
        shape = (N_CHANNELS, self.loads, len(self.centres))
        self.fine_sends = np.zeros(shape)
        self.fine_unsubs = np.zeros(shape)
        self.g = 0.0
        self._fitted_at = -1.0

    def learn(self, channel: int, load: int, unsubscribed: bool, fit: float = 0.0) -> None:
        """Count one labelled send, with the log engagement lift of its hour (``fit``)."""
        k = self.bucket(load)
        b = int(np.searchsorted(self.edges, fit))
        self.sends[channel, k] += 1
        self.fine_sends[channel, k, b] += 1
        if unsubscribed:
            self.unsubscribes[channel, k] += 1
            self.fine_unsubs[channel, k, b] += 1

    def late_unsubscribe(self, channel: int, load: int, fit: float = 0.0) -> None:
        """As :meth:`FatigueHazard.late_unsubscribe`, in the send's timing bin too."""
        k = self.bucket(load)
        self.unsubscribes[channel, k] += 1
        self.fine_unsubs[channel, k, int(np.searchsorted(self.edges, fit))] += 1

    def timing_factor(self, fit: float | np.ndarray) -> Any:
        """The risk multiplier of a send whose hour has log engagement lift ``fit`` (clipped to +-0.9)."""
        return np.exp(self.g * np.minimum(np.maximum(fit, -0.9), 0.9))  # np.clip, without its wrapper

    def rates(self) -> np.ndarray:
        """Posterior mean risk per (channel, load cell) at an average hour (``fit`` 0)."""
        total = float(self.sends.sum())
        if self._rates is None or total >= max(self._fitted_at * 1.01, self._fitted_at + 20):
            self._fit()
            self._fitted_at = total
        assert self._rates is not None
        return self._rates

    def _fit(self) -> None:
        k = np.arange(self.loads, dtype=float)
        load_m = 1 + self.slopes[:, None] * k[None, :]  # (S, K)
        time_m = np.exp(self.timings[:, None] * self.centres[None, :])  # (G, B)
        # Exposure per channel for every (s, g): sum over cells of sends x multiplier.
        by_load = self.fine_sends @ time_m.T  # (C, K, G)
        expo = np.einsum("sk,ckg->csg", load_m, by_load)  # (C, S, G)
        u_ch = self.fine_unsubs.sum(axis=(1, 2))  # (C,)
        b0 = self.strength * 2.0
        a0 = self.base_prior * b0
        r = (u_ch[:, None, None] + a0) / (expo + b0)  # (C, S, G)
        # log multiplier of the unsubscribes' cells (their rates' log, beyond r)
        u_load = self.fine_unsubs.sum(axis=2)  # (C, K)
        u_bin = self.fine_unsubs.sum(axis=1)  # (C, B)
        ll_load = np.log(load_m) @ u_load.sum(axis=0)  # (S,)
        ll_time = self.timings * float(self.centres @ u_bin.sum(axis=0))  # (G,)
        ll = (u_ch[:, None, None] * np.log(r) - r * expo).sum(axis=0) + ll_load[:, None] + ll_time[None, :]
        # Priors: log(0.1 + s) normal around the configured slope (sd 1), g normal around 0 (sd 0.5).
        ls = np.log(0.1 + self.slopes) - math.log(0.1 + self.slope_prior)
        ll -= 0.5 * ls[:, None] ** 2 + 0.5 * (self.timings[None, :] / 0.5) ** 2
        w = np.exp(ll - ll.max())
        w /= w.sum()
        self.g = float((w.sum(axis=0) * self.timings).sum())
        # The curve at fit 0: the posterior mean over (s, g) of r * (1 + s k); each (channel, load)
        # cell is shrunk towards it (instead of towards a fixed prior) with the weight of
        # ``strength`` sends, so a risk the straight line misses (a jump at high load) still shows.
        curve = np.einsum("sg,csg,sk->ck", w, r, load_m)
        expected = self.fine_sends @ np.exp(self.g * self.centres)  # the sends' timing, in fit-0 units
        cells = (self.unsubscribes + self.strength * curve) / (expected + self.strength)
        self._rates = np.maximum.accumulate(cells, axis=1)


#: The grid of open rates (at the preferred hour) a customer's opens are weighed over, each as likely.
OPEN_RATES = np.array([0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])


class HourPreference:
    """Each customer's preferred local hour as a discrete posterior over 24 hours, with a population prior.

    The model: a message sent at local hour ``h`` to a customer whose preferred hour is ``m``
    is engaged with ``q * F[h, m]``, where ``F = floor + (1 - floor) * exp(-d^2 / 2 width^2)``
    for the circular distance ``d`` between ``h`` and ``m``, and ``q`` the customer's rate at
    their preferred hour. Per customer, the log-likelihood of each ``m`` adds up over every
    labelled send: a click at ``h`` favours the ``m`` near ``h``, a send not clicked at ``h``
    (slightly) disfavours them. The prior over ``m`` comes from the population: for every
    trait value, the click rate by local send hour (counts, smoothed over neighbouring hours
    and towards that trait's overall rate); a customer's prior multiplies the lifts of their
    trait values against everyone's (naive Bayes, as a log-linear model would). So a new
    customer gets the hours that customers like them click at, and their own clicks and
    silences move it from there. A draw of ``m`` from the posterior is the Thompson draw.

    >>> hp = HourPreference(width=2.5, floor=0.2, strength=20.0, power=1.0)
    >>> ll = np.zeros(24)
    >>> for h in (14, 14, 15):
    ...     ll = hp.update(ll, h, True, 0.1)
    >>> post = hp.posterior(ll, hp.log_prior([]))
    >>> int(np.argmax(post)) in (14, 15)
    True
    >>> lift = hp.lift(post)
    >>> bool(lift[14] > 2 * lift[3])
    True
    """

    def __init__(
        self, *, width: float, floor: float, strength: float, power: float, miss_weight: float = 1.0
    ) -> None:
        d = np.abs(np.arange(24)[:, None] - np.arange(24)[None, :])
        d = np.minimum(d, 24 - d)
        #: F[h, m]: the engagement at send hour h of a customer who prefers m, as a share of the peak.
        self.F = floor + (1 - floor) * np.exp(-(d * d) / (2 * width * width))
        #: Centred so a customer about whom nothing is known (a flat posterior) gets no offset.
        self.reference = float(self.F.mean())
        self.logF = np.log(self.F / self.reference)
        self.smooth = np.exp(-(d * d) / 2.0)  # one-hour kernel for the population's counts
        self.strength = strength
        self.power = power
        self.miss_weight = miss_weight
        self.clicks = np.zeros((1 + TRAIT_BUCKETS, 24))  # row 0: everyone; 1 + b: trait bucket b
        self.sends = np.zeros((1 + TRAIT_BUCKETS, 24))
        #: Per row: (sends when computed, log lift and its spread by hour). Refreshed by :meth:`learn`
        #: once the row has 2% (at least 20) more sends, never by a read: what a read answers is a
        #: function of the labels learned, so a learner that replayed the same labels (a restart)
        #: values every option as the one that served meanwhile did.
        self._lift_cache: dict[int, tuple[float, np.ndarray]] = {}
        #: Per trait-bucket tuple: (its rows' ``_lift_cache`` stamps, log prior, its spread, the
        #: ``_lift_version`` it was last checked at: until a row is refreshed, no stamp is compared).
        self._prior_cache: dict[tuple[int, ...], tuple[object, np.ndarray, np.ndarray, int]] = {}
        self._lift_version = 0
        self._total = 0.0

    def learn(self, buckets: Sequence[int], hour: int, clicked: bool) -> None:
        """Count one labelled send at local ``hour`` for everyone and each of the customer's trait buckets."""
        rows = [0, *(1 + b for b in buckets)]
        self.sends[rows, hour] += 1
        self._total += 1
        if clicked:
            self.clicks[rows, hour] += 1
        cache = self._lift_cache
        for row in rows:
            cached = cache.get(row)
            done = 0.0 if cached is None else cached[0]  # a row not computed yet stands as its empty counts
            if float(self.sends[row].sum()) - done >= max(20.0, 0.02 * done):
                self._compute_row(row)

    def _compute_row(self, row: int, *, empty: bool = False) -> np.ndarray:
        """Row ``row``'s lift from its counts now, kept (``empty``: from no counts, not kept)."""
        clicks = np.zeros(24) if empty else self.clicks[row]
        sends_h = np.zeros(24) if empty else self.sends[row]
        sends = float(sends_h.sum())
        c = self.smooth @ clicks
        n = self.smooth @ sends_h
        overall = (clicks.sum() + 1.0) / (sends + 30.0)
        a = c + self.strength * overall
        rate = a / (n + self.strength)
        lift = np.stack((np.log(rate / overall), 1 / np.sqrt(a)))
        if not empty:
            self._lift_cache[row] = (sends, lift)
            self._lift_version = self.__dict__.get("_lift_version", 0) + 1
        return lift

    def _row_lift(self, row: int) -> np.ndarray:
        """Log click-rate lift by hour of one row, and its standard error (shape (2, 24)), as last
        refreshed by :meth:`learn` (a row with fewer than 20 sends stands as its empty counts, as a row
        first read before its first send did until it had 20)."""
        cached = self._lift_cache.get(row)
        if cached is None:
            empty = self.__dict__.get("_empty_lift")
            if empty is None:
                empty = self.__dict__["_empty_lift"] = self._compute_row(row, empty=True)
            return empty
        return cached[1]

    def prior_parts(self, buckets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The log prior of :meth:`log_prior` and the spread of its draw (``log_prior + spread * noise``)."""
        key = tuple(buckets)
        version = self.__dict__.get("_lift_version", 0)
        cached = self._prior_cache.get(key)
        if cached is not None and len(cached) == 4 and cached[3] == version:  # no row refreshed since
            return cached[1], cached[2]
        cache = self._lift_cache
        # the rows' stamps: recomputed exactly when one of its rows was refreshed
        stamp = tuple(cache[r][0] if r in cache else -1.0 for r in (0, *(1 + b for b in key)))
        if cached is not None and cached[0] == stamp:
            self._prior_cache[key] = (stamp, cached[1], cached[2], version)
        else:
            if len(self._prior_cache) >= 10_000:
                self._prior_cache.clear()
            base = self._row_lift(0)
            out = base[0].copy()
            var = base[1] ** 2
            for b in buckets:
                row = self._row_lift(1 + b)
                out += row[0] - base[0]
                var += row[1] ** 2
            cached = self._prior_cache[key] = (stamp, self.power * out, self.power * np.sqrt(var), version)
        return cached[1], cached[2]

    def log_prior(self, buckets: Sequence[int], noise: np.ndarray | None = None) -> np.ndarray:
        """Log prior over the preferred hour of a customer with these trait buckets (unnormalised).

        With ``noise`` (24 standard normals), one draw of the population's curves from their
        (log-normal) posterior, the rows' errors taken as independent: hours the population
        was rarely sent at are uncertain, so they get tried (Thompson sampling).
        """
        lp, spread = self.prior_parts(buckets)
        if noise is None:
            return lp
        return np.asarray(lp + spread * noise)

    def update(self, loglik: np.ndarray, hour: int, clicked: bool, q: float) -> np.ndarray:
        """The customer's log-likelihood over preferred hours after one labelled send at ``hour``."""
        if clicked:
            return np.asarray(loglik + self.logF[hour])
        return np.asarray(loglik + self.miss_weight * np.log1p(-q * self.F[hour]))  # F: centring cancels

    def open_loglik(self, counts: np.ndarray) -> np.ndarray:
        """The log-likelihood over preferred hours of a customer's opens (centred on its mean).

        ``counts``: per local send hour, the sends on channels that report opens and how many of
        them were opened (shape (2, 24)). A send at ``h`` to a customer who prefers ``m`` is
        opened with ``q * F[h, m]``; unlike clicks, the sends not opened count too (opens are
        frequent enough that counting only them would find the hours the customer was sent at),
        and the customer's open rate ``q`` is not known: the likelihood is summed over a grid of
        rates with a flat prior (:data:`OPEN_RATES`). A customer who opens at every hour alike,
        or never, is told little about their hour.

        >>> hp = HourPreference(width=2.5, floor=0.2, strength=20.0, power=1.0)
        >>> counts = np.zeros((2, 24))
        >>> counts[0, [9, 19]] = 6
        >>> counts[1, 19] = 4  # opened 4 of 6 at 19:00, none of 6 at 09:00
        >>> ll = hp.open_loglik(counts)
        >>> int(np.argmax(ll)), bool(ll[19] - ll[9] > 3)
        (19, True)
        >>> counts[1, 9] = 4  # as often at 09:00
        >>> bool(abs(hp.open_loglik(counts)[19] - hp.open_loglik(counts)[9]) < 1e-9)
        True
        """
        tables = self.__dict__.get("_open_tables")
        if tables is None:  # lazily: a snapshot from before opens were learned lacks them
            q = OPEN_RATES[:, None, None]
            tables = self.__dict__["_open_tables"] = (np.log(q * self.F), np.log1p(-q * self.F))
        hit, miss = tables
        # (rates, m): sum over send hours h of opened * log(q F[h, m]) + not opened * log(1 - q F[h, m])
        ll = np.tensordot(counts[1], hit, axes=([0], [1]))
        ll += np.tensordot(counts[0] - counts[1], miss, axes=([0], [1]))
        top = float(ll.max())
        out = np.log(np.exp(ll - top).sum(axis=0)) + top
        return np.asarray(out - out.mean())

    def posterior(self, loglik: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
        """The posterior over the preferred hour (sums to 1)."""
        x = loglik + log_prior
        x = np.exp(x - x.max())
        return np.asarray(x / x.sum())

    def lift(self, posterior: np.ndarray) -> np.ndarray:
        """Expected engagement at each send hour (0..23) under ``posterior``, relative to a flat posterior's."""
        return np.asarray(self.F @ posterior) / self.reference


@dataclass
class CustomerStats:
    """What the learner remembers about one customer (from feedback joined to its decisions)."""

    sends: deque[int] = field(default_factory=deque)  # send times in the last 30 days
    channel_sends: dict[str, int] = field(default_factory=dict)
    channel_clicks: dict[str, int] = field(default_factory=dict)
    hour_cos: float = 0.0
    hour_sin: float = 0.0
    clicks: int = 0
    last_click_ms: int | None = None
    #: The customer's own engagement effect per channel, shape (2, channels): posterior means
    #: and variances (None: still the prior). A class default, so older snapshots load.
    effect: np.ndarray | None = None
    #: Log-likelihood of each preferred local hour 0..23 from the customer's labelled sends (None: no label yet).
    hour_loglik: np.ndarray | None = None
    #: Per channel: clicks and expected clicks (the population model's), for ``customer_model="gamma"``.
    gamma: np.ndarray | None = None
    #: Per local send hour: labelled sends on channels that report opens, and how many were opened
    #: (shape (2, 24), float32; None: none yet). ``hour_loglik`` includes the part they make
    #: (:meth:`DecisionLearner._open_part`).
    open_counts: np.ndarray | None = None


@dataclass
class Pending:
    """A sent decision waiting for its labels."""

    customer_id: int
    idx: np.ndarray
    val: np.ndarray
    sent_ms: int
    channel: str
    campaign: str
    arm: str | None
    engaged: bool = False
    unsubscribed: bool = False
    opened: bool = False  # an open was observed (evidence of the hour: ``hour_open_weight``)
    open_counted: bool = False  # counted in the customer's ``open_counts`` when labelled
    load: int = 0  # sends in the 7 days before the decision
    hour: int = -1  # local hour of the send (0..23), for the hour preference
    offset: float = 0.0  # the hour preference's term in the engagement score when decided
    rate: float = 0.05  # the expected engagement at the customer's preferred hour when decided
    buckets: tuple[int, ...] = ()  # the customer's trait buckets
    learned: bool = False  # the provisional label was learned (``label_delay_ms``); kept until the horizon
    #: How far the learner had read the event log when it computed these features (None: not known):
    #: stored with the decision (``decisions.learner_position``) so that a replay registers it there.
    position: int | None = None

    def stored(self) -> dict[str, Any]:
        """What the ``decisions`` row keeps, so a restart registers the decision exactly as it was made.

        >>> p = Pending(7, np.array([0, 5]), np.array([1.0, 0.25]), 0, "email", "c", None, load=2,
        ...             hour=9, offset=0.125, rate=0.04, buckets=(3, 17))
        >>> p.stored()
        {'idx': [0, 5], 'val': [1.0, 0.25], 'load': 2, 'hour': 9, 'offset': 0.125, 'rate': 0.04, 'buckets': [3, 17]}
        >>> q = Pending.restored(p.stored(), customer_id=7, sent_ms=0, channel="email", campaign="c", arm=None)
        >>> (q.idx.tolist(), q.val.tolist(), q.load, q.hour, q.offset, q.rate, q.buckets)
        ([0, 5], [1.0, 0.25], 2, 9, 0.125, 0.04, (3, 17))
        """
        return {
            "idx": self.idx.tolist(),
            "val": self.val.tolist(),
            "load": self.load,
            "hour": self.hour,
            "offset": self.offset,
            "rate": self.rate,
            "buckets": list(self.buckets),
        }

    @classmethod
    def restored(
        cls,
        stored: Mapping[str, Any],
        *,
        customer_id: int,
        sent_ms: int,
        channel: str,
        campaign: str,
        arm: str | None,
    ) -> Pending:
        """The pending decision :meth:`stored` described (float values round-trip exactly through JSON)."""
        return cls(
            customer_id=customer_id,
            idx=np.asarray(stored["idx"], dtype=np.int64),
            val=np.asarray(stored["val"], dtype=np.float64),
            sent_ms=sent_ms,
            channel=channel,
            campaign=campaign,
            arm=arm,
            load=int(stored.get("load", 0)),
            hour=int(stored.get("hour", -1)),
            offset=float(stored.get("offset", 0.0)),
            rate=float(stored.get("rate", 0.05)),
            buckets=tuple(int(b) for b in stored.get("buckets", ())),
        )


class DecisionLearner:
    """Both models, the customer memory, the pending labels and the recent quality.

    Implements :class:`~cadence.engine.decision.Scorer` (``score``) and the vectorised
    ``score_options`` that :func:`~cadence.engine.decide.decide` prefers when present.
    Deterministic: the same calls in the same order (and seeds) give the same state.
    """

    #: The latest time :meth:`advance` has reached (a class default, so older snapshots load).
    clock_ms = 0

    def __init__(self, config: LearnerConfig | None = None) -> None:
        self.config = config or LearnerConfig()
        self.layout = FeatureLayout()
        lay = self.layout
        prior_var = lay.prior_variance(self.config.crossed_prior_var)
        self.engagement = self._model(self.config.engagement_prior, prior_var)
        self.unsubscribe = self._model(self.config.unsubscribe_prior, prior_var * 0.5)
        self.hazard = self._hazard()
        self.hours = self._hours()
        self.customers: dict[int, CustomerStats] = {}
        self.pending: dict[str, Pending] = {}
        self.position = 0  # the last event id reflected (set by the loop subscriber)
        self.labels = 0
        self.quality: dict[str, Any] = {
            # RollingROCAUC is exact; ROCAUC's 10 thresholds cannot rank probabilities below 0.1.
            "engagement_auc": metrics.RollingROCAUC(window_size=self.config.quality_window),  # type: ignore[no-untyped-call]
            "engagement_logloss": utils.Rolling(metrics.LogLoss, window_size=self.config.quality_window),
            "unsubscribe_auc": metrics.RollingROCAUC(window_size=self.config.quality_window),  # type: ignore[no-untyped-call]
        }
        # The labels in each AUC's window: river reads 0.0 where the AUC is undefined (no positive
        # or no negative label in the window), which read as a perfectly wrong model.
        self.quality_labels: dict[str, deque[bool]] | None = {
            key: deque(maxlen=self.config.quality_window) for key in ("engagement_auc", "unsubscribe_auc")
        }
        # (horizon, decision id), a heap: labels are learned in horizon order, ties by id, so the
        # order does not depend on when a decision was registered (at commit, or again after a restart)
        self._horizon: list[tuple[int, str]] = []
        #: The channels some customer has opened a message on: their sends count in the opens.
        self.open_channels: set[str] = set()
        self._group_meta: dict[tuple[tuple[str, str, str | None], ...], _GroupStruct] = {}
        self._bank = _noise_bank(self.layout.size)

    def _hazard(self) -> FatigueHazard:
        cfg = self.config
        return (FittedHazard if cfg.hazard_fit else FatigueHazard)(
            prior=cfg.unsubscribe_prior, strength=cfg.hazard_strength, slope=cfg.hazard_load_slope
        )

    def _hours(self) -> HourPreference:
        cfg = self.config
        return HourPreference(
            width=cfg.hour_width,
            floor=cfg.hour_floor,
            strength=cfg.hour_pop_strength,
            power=cfg.hour_prior_power,
            miss_weight=cfg.hour_miss_weight,
        )

    def hour_posterior(self, stats: CustomerStats, buckets: Sequence[int]) -> np.ndarray:
        """The customer's posterior over their preferred local hour (0..23)."""
        loglik = stats.hour_loglik if stats.hour_loglik is not None else _ZERO24
        return self.hours.posterior(loglik, self.hours.log_prior(buckets))

    def hour_offsets(
        self,
        stats: CustomerStats,
        buckets: Sequence[int],
        hours: np.ndarray,
        uniform: float,
        noise: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The hour preference's score terms at fractional local ``hours``: posterior mean and one draw.

        The mean is ``scale * log E[F[h, m]]``; the draw takes one preferred hour ``m`` from
        the posterior (``uniform`` in [0, 1) picks it) and uses ``scale * log F[h, m]``.
        """
        rows = self._hour_offset_rows(stats, buckets, hours, uniform, noise)
        return rows[0], rows[1]

    def _hour_offset_rows(
        self,
        stats: CustomerStats,
        buckets: Sequence[int],
        hours: np.ndarray,
        uniform: float,
        noise: np.ndarray | None = None,
        whole: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`hour_offsets` as one (2, len(hours)) array (rows: mean, draw), added to the time part at once.

        ``whole``: the whole local hours of ``hours`` (``hours.astype(int) % 24``) when the caller has them.
        """
        hp = self.hours
        cfg = self.config
        lp, spread = hp.prior_parts(buckets)
        # Rows: the posterior with the population's mean curve, and with its draw (one batch).
        x = np.empty((2, 24))
        x[0] = lp
        if cfg.hour_pop_draw and noise is not None:
            np.multiply(spread, noise, out=x[1])
            x[1] += lp
        else:
            x[1] = lp
        if stats.hour_loglik is not None:
            x += stats.hour_loglik
        x -= np.maximum.reduce(x, axis=None)  # (ndarray.max and .sum, without their Python wrappers)
        np.exp(x, out=x)
        lift = (x @ hp.F.T) / (np.add.reduce(x, axis=1, keepdims=True) * hp.reference)
        h = hours.astype(np.int64) % 24 if whole is None else whole
        if not cfg.hour_explore:
            # The log of the 24 hours' lifts, then each send time's: the same numbers as the log per time.
            log_lift = np.log(lift, out=lift)
            log_lift *= cfg.hour_offset_scale
            rows: np.ndarray = log_lift.take(h, axis=1)
            return rows
        off: np.ndarray = cfg.hour_offset_scale * np.log(lift[:, h])
        post = x[1] / x[1].sum()
        m = min(int(np.searchsorted(np.cumsum(post), uniform)), 23)
        off[1] = cfg.hour_offset_scale * hp.logF[h, m]
        return off

    def __getstate__(self) -> dict[str, Any]:
        """What a snapshot keeps: not the bank of normals nor caches (remade on load)."""
        state = dict(self.__dict__)
        state.pop("_bank", None)
        state.pop("_group_meta", None)
        state.pop("_rate_exp_fresh", None)
        state.pop("_time_pool", None)
        state.pop("_pending_of", None)
        state.pop("_pending_of_size", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Load a snapshot; one written before the fatigue hazard existed starts it from its prior."""
        self.__dict__.update(state)
        if "hazard" not in state:
            self.hazard = self._hazard()
        if "hours" not in state:
            self.hours = self._hours()
        if "quality_labels" not in state:
            self.quality_labels = None  # written before they were kept: see recent_quality
        if "open_channels" not in state:
            self.open_channels = set()  # written before opens were learned
        self._group_meta = {}
        if "_bank" not in state:
            self._bank = _noise_bank(self.layout.size)

    def reconfigure(self, config: LearnerConfig) -> None:
        """Value options with ``config`` from now on (a stored learner taking new settings).

        Only :data:`DECISION_TIME_FIELDS` may differ: raises ``ValueError`` naming the others,
        which need a learner that learned with them.
        """
        changed = learned_differences(self.config, config)
        if changed:
            raise ValueError(f"the learner learned with other values of {', '.join(changed)}")
        self.config = config
        self._group_meta = {}
        self.__dict__.pop("_time_pool", None)

    def recent_load(self, customer_id: int, now_ms: int) -> int:
        """Sends to the customer in the 7 days before ``now_ms`` (as the learner has seen them)."""
        sends = self.customer(customer_id).sends
        return sum(1 for s in sends if now_ms - 7 * DAY_MS <= s < now_ms)

    def _model(self, prior: float, prior_var: np.ndarray) -> ProbitModel:
        lay = self.layout
        mean = np.zeros(lay.size)
        # Split the prior log-odds between the channel bias and a shared share of variance.
        z = float(-math.sqrt(2) * _erfcinv(2 * prior)) * math.sqrt(self.config.beta**2 + 0.3)
        for c in range(N_CHANNELS):
            mean[lay.channel + c * lay.n_customer] = z
        return ProbitModel(size=lay.size, prior_mean=mean, prior_var=prior_var, beta=self.config.beta)

    def _noise(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Two standard normal vectors for ``seed``: rows of a fixed bank, rotated.

        Seeding a fresh generator per decision costs more than the rest of the scoring,
        so draws come from a bank made once; (engagement, unsubscribe) row pairs repeat
        only after ``rows ** 2`` seeds.
        """
        bank = self._bank
        rows = bank.shape[0]
        k = (seed * 2654435761) & 0xFFFFFFFF
        return bank[k % rows], bank[(k // rows + 7) % rows]

    def _rate_exp(self, stats: CustomerStats) -> np.ndarray:
        """Per channel (rows): the customer's own smoothed log click-rate lift and log experience.

        What ``_personal`` gives, without the hour; a customer with no send yet (the same for all
        of them) is worked out once per learner.
        """
        fresh = not stats.channel_sends and not stats.channel_clicks
        if fresh:
            known: np.ndarray | None = self.__dict__.get("_rate_exp_fresh")
            if known is not None:
                return known
        prior = self.config.engagement_prior
        log_prior = math.log(prior)
        flat: list[float] = []
        for ch in CHANNELS:
            n = stats.channel_sends.get(ch, 0)
            flat += (
                math.log((stats.channel_clicks.get(ch, 0) + 3 * prior) / (n + 3)) - log_prior,
                math.log1p(n),
            )
        out = np.array(flat).reshape(N_CHANNELS, 2)
        if fresh:
            out.flags.writeable = False
            self.__dict__["_rate_exp_fresh"] = out
        return out

    # -- features -------------------------------------------------------------------------------

    def customer(self, customer_id: int) -> CustomerStats:
        """The stats kept for ``customer_id`` (created empty on first use)."""
        stats = self.customers.get(customer_id)
        if stats is None:
            stats = self.customers[customer_id] = CustomerStats()
        return stats

    def effect(self, customer_id: int) -> np.ndarray:
        """The customer's own per-channel engagement effect, (means, variances); created at the prior."""
        stats = self.customer(customer_id)
        if stats.effect is None:
            stats.effect = np.array(
                [np.zeros(N_CHANNELS), np.full(N_CHANNELS, self.config.customer_channel_var)]
            )
        return stats.effect

    def absorb(self, winner: int, loser: int) -> bool:
        """Fold ``loser``'s stats and pending decisions into ``winner``'s (a merge); False if it had none.

        Both customers' feedback is the same person's evidence, so it is combined, not chosen:
        counts and send times add up, the preferred-hour log-likelihoods add (each is a sum over
        the customer's labelled sends), and the two engagement effects, each a Gaussian posterior
        from the same prior, combine as their product over that prior (precisions add, less the
        prior's once). Before, the winner kept its own effect and hours and lost the loser's.
        """
        stats = self.customers.pop(loser, None)
        if stats is None:
            # Every pending decision's customer has stats (see remember): no walk over every
            # pending decision (up to max_recall) for each merge of a customer with nothing learned.
            return False
        index = self._pending_ids()
        moved = []
        for key in index.pop(loser, ()):
            p = self.pending.get(key)
            if p is not None and p.customer_id == loser:
                p.customer_id = winner
                moved.append(key)
        if moved:
            index.setdefault(winner, []).extend(moved)
        target = self.customer(winner)
        target.sends = type(target.sends)(sorted([*target.sends, *stats.sends]))
        for ch, n in stats.channel_sends.items():
            target.channel_sends[ch] = target.channel_sends.get(ch, 0) + n
        for ch, n in stats.channel_clicks.items():
            target.channel_clicks[ch] = target.channel_clicks.get(ch, 0) + n
        target.hour_cos += stats.hour_cos
        target.hour_sin += stats.hour_sin
        target.clicks += stats.clicks
        if stats.last_click_ms is not None:
            target.last_click_ms = max(target.last_click_ms or 0, stats.last_click_ms)
        if stats.hour_loglik is not None:
            mine = target.hour_loglik
            target.hour_loglik = stats.hour_loglik.copy() if mine is None else mine + stats.hour_loglik
        if stats.open_counts is not None and target.hour_loglik is not None:
            # Both opens' parts were added above: one part, from the counts together, stands for them.
            mine = target.open_counts
            loglik = target.hour_loglik - self._open_part(stats.open_counts)
            if mine is not None:
                loglik -= self._open_part(mine)
            target.open_counts = stats.open_counts.copy() if mine is None else mine + stats.open_counts
            target.hour_loglik = np.asarray(loglik + self._open_part(target.open_counts))
        if stats.gamma is not None:
            target.gamma = stats.gamma.copy() if target.gamma is None else target.gamma + stats.gamma
        if stats.effect is not None:
            if target.effect is None:
                target.effect = stats.effect.copy()
            else:
                prior = 1.0 / self.config.customer_channel_var
                p1, p2 = 1.0 / target.effect[1], 1.0 / stats.effect[1]
                # Never less certain than either side (an approximate update could leave a
                # variance above the prior's).
                precision = np.maximum(p1 + p2 - prior, np.maximum(p1, p2))
                mean = (target.effect[0] * p1 + stats.effect[0] * p2) / precision
                target.effect = np.array([mean, 1.0 / precision])
        return True

    def forget(self, customer_id: int) -> int:
        """Forget a customer who is being erased: their statistics (their own effects included) and
        pending decisions; returns how many of those. The shared weights hold no customer."""
        self.customers.pop(customer_id, None)
        forgotten = 0
        for key in self._pending_ids().pop(customer_id, ()):
            p = self.pending.get(key)
            if p is not None and p.customer_id == customer_id:  # (not learned and dropped since)
                del self.pending[key]
                forgotten += 1
        return forgotten

    def _pending_ids(self) -> dict[int, list[str]]:
        """Customer -> the ids of its pending decisions (and of some since learned: check ``pending``).

        Kept beside ``pending`` (not in snapshots), so a merge moves the merged-away customer's
        decisions without walking every pending one (200,000 pending: 17 ms a merge, against 0.9 ms). Ids
        of decisions learned since stay until the index is rebuilt, once it holds twice as many
        as ``pending``.
        """
        index: dict[int, list[str]] | None = self.__dict__.get("_pending_of")
        if index is None or self.__dict__["_pending_of_size"] > 2 * len(self.pending) + 1024:
            index = {}
            for key, p in self.pending.items():
                index.setdefault(p.customer_id, []).append(key)
            self.__dict__["_pending_of"] = index
            self.__dict__["_pending_of_size"] = len(self.pending)
        return index

    def _trait_buckets(self, traits: Mapping[str, Any]) -> list[int]:
        ignored = self.config.ignored_traits
        if not ignored.isdisjoint(traits):
            traits = {k: v for k, v in traits.items() if k not in ignored}
        try:
            key = tuple((k, v, type(v)) for k, v in traits.items())  # 1, 1.0 and True bucket apart
            cached = _TRAIT_CACHE.get(key)
        except TypeError:  # an unhashable trait value (a list, a dict)
            key, cached = None, None
        if cached is not None:
            return cached
        out = self._trait_buckets_uncached(traits)
        if key is not None:
            if len(_TRAIT_CACHE) >= 100_000:
                _TRAIT_CACHE.clear()
            _TRAIT_CACHE[key] = out
        return out

    def _trait_buckets_uncached(self, traits: Mapping[str, Any]) -> list[int]:
        out = []
        for key, value in traits.items():
            if isinstance(value, str) and identifying_value(value):
                continue
            if isinstance(value, (str, bool)) or value is None:
                out.append(_bucket(f"{key}={value}", TRAIT_BUCKETS))
            elif isinstance(value, (int, float)):
                out.append(_bucket(f"{key}~{int(math.log2(abs(value) + 1))}", TRAIT_BUCKETS))
        return out

    def _customer_vector(self, stats: CustomerStats, traits: Mapping[str, Any], now_ms: int) -> np.ndarray:
        b = np.zeros(self.layout.n_customer)
        b[0] = 1.0
        for t in self._trait_buckets(traits):
            b[1 + t] = 1.0
        b[1 + TRAIT_BUCKETS :] = _activity(stats, now_ms)
        return b

    def _traits1(self, traits: Mapping[str, Any]) -> np.ndarray:
        t = np.zeros(self.layout.n_traits1)
        t[0] = 1.0
        for b in self._trait_buckets(traits):
            t[1 + b] = 1.0
        return t

    def _personal(self, stats: CustomerStats, channel: str, hour: float) -> tuple[float, float, float]:
        sends = stats.channel_sends.get(channel, 0)
        clicks = stats.channel_clicks.get(channel, 0)
        prior = self.config.engagement_prior
        rate = math.log((clicks + 3 * prior) / (sends + 3)) - math.log(prior)
        match = 0.0
        if stats.clicks:
            angle = TWO_PI * hour / 24
            resultant = math.hypot(stats.hour_cos, stats.hour_sin) / stats.clicks
            mean_angle = math.atan2(stats.hour_sin, stats.hour_cos)
            match = math.cos(angle - mean_angle) * resultant * stats.clicks / (stats.clicks + 1)
        return rate, match, math.log1p(sends)

    def features(
        self,
        *,
        customer_id: int,
        traits: Mapping[str, Any],
        zone: str | None,
        campaign: str,
        channel: str,
        send_at_ms: int,
        arm: str | None,
        now_ms: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The sparse feature vector ``(indices, values)`` of one candidate."""
        lay = self.layout
        stats = self.customer(customer_id)
        # The nonzero entries of the customer vector and the traits row (:meth:`_customer_vector`,
        # :meth:`_traits1`) in index order, as Python numbers: a sending commit computes these on the
        # event loop, and building the arrays to find them cost half of this method.
        t_idx = [0, *sorted({1 + t for t in self._trait_buckets(traits)})]
        t_val = [1.0] * len(t_idx)
        start = lay.channel + CHANNEL_INDEX.get(channel, 0) * lay.n_customer
        idx: list[int] = [start + i for i in t_idx]
        val: list[float] = t_val.copy()
        for k, x in enumerate(_activity(stats, now_ms), start=start + 1 + TRAIT_BUCKETS):
            if x != 0.0:
                idx.append(k)
                val.append(x)
        local = local_datetime(send_at_ms, zone_named(zone, "UTC"))
        hour = local.hour + local.minute / 60
        harm = _time_code(hour, local.weekday() >= 5) if self.config.probit_hours else ()
        first = 0 if self.config.hour_onehot else 24  # without the one-hot hour: the cycle and weekend only
        for k, h in enumerate(harm):
            if h == 0.0 or k < first:
                continue
            row = lay.time + k * lay.n_traits1
            idx += [row + i for i in t_idx]
            val += [h * x for x in t_val]
        for k, p in enumerate(self._personal(stats, channel, hour)):
            if k == 1 and not self.config.probit_hours:
                continue
            idx.append(lay.personal + k)
            val.append(p)
        idx.append(lay.campaign + _bucket(campaign, CAMPAIGN_BUCKETS))
        val.append(1.0)
        idx.append(lay.campaign_channel + _bucket(f"{campaign}/{channel}", CAMPAIGN_BUCKETS))
        val.append(1.0)
        if arm is not None:
            row = lay.arm + _bucket(f"{campaign}/{arm}", ARM_BUCKETS) * lay.n_traits1
            idx += [row + i for i in t_idx]
            val += t_val
        return np.array(idx, dtype=np.int64), np.array(val)

    # -- scoring --------------------------------------------------------------------------------

    def _group_struct(self, sig: Sequence[tuple[str, str, str | None]]) -> _GroupStruct:
        """Per group (``(campaign, channel, variant)`` names): channel, weight indices, campaign number."""
        lay = self.layout
        rows: list[int] = []
        camp_ids: dict[str, int] = {}
        for name, channel, arm in sig:
            camp_id = camp_ids.setdefault(name, len(camp_ids))
            rows += (
                CHANNEL_INDEX.get(channel, 0),
                lay.campaign + _bucket(name, CAMPAIGN_BUCKETS),
                lay.campaign_channel + _bucket(f"{name}/{channel}", CAMPAIGN_BUCKETS),
                -1 if arm is None else _bucket(f"{name}/{arm}", ARM_BUCKETS),
                camp_id,
            )
        cols = np.array(rows, dtype=np.int64).reshape(len(sig), 5).T.copy()
        for col in cols:
            col.flags.writeable = False
        camp_of = rows[4::5]
        starts = None
        if all(a <= b for a, b in zip(camp_of, camp_of[1:], strict=False)):  # ids follow first appearance
            starts = np.array(
                [k for k, c in enumerate(camp_of) if k == 0 or c != camp_of[k - 1]], dtype=np.int64
            )
        return (
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            len(camp_ids),
            any(arm is not None for _, _, arm in sig),
            starts,
            -1 - cols[0],
        )

    def _pooled_time_block(self) -> tuple[np.ndarray, np.ndarray]:
        """The engagement model's hour x trait block as options are valued with ``hour_pool``: means, variances.

        The learning's prior holds each one-hot hour weight independent, N(0, p) (``p`` the crossed
        prior variance). Valued pooled, each trait row's 24 weights are ``w_h = mu + d_h``: a level
        ``mu ~ N(0, s2)`` and hour deviations ``d_h ~ N(0, tau2)``, ``s2 = share * p`` and
        ``tau2 = p - s2`` (``share`` = ``hour_pool_share``): each weight's prior is the same, the
        hours now correlated through the level. The diagonal posterior holds, per weight, the prior
        times the evidence's Gaussian message, precision ``lam_h = 1/var_h - 1/p`` and
        precision-weighted mean ``eta_h = mean_h / var_h``. The 24 messages give the level's
        posterior in closed form (precision ``1/s2 + sum lam_h a_h``, mean ``sum eta_h a_h`` over it,
        ``a_h = 1 / (1 + tau2 lam_h)``), and each hour's weight the mean
        ``(E[mu]/tau2 + eta_h) / (1/tau2 + lam_h)`` (an hour never sent at: ``E[mu]``; a well-sent
        hour: about its own evidence) and the variance ``1/(1/tau2 + lam_h)`` plus the level's
        variance seen through it. A learner that learned nothing values options as without pooling.
        The other rows (the daily cycle's cos and sin, weekend) are the posterior's own. Worked out
        once per learned label, kept.

        >>> learner = DecisionLearner(LearnerConfig(hour_pool=True))
        >>> mean, var = learner._pooled_time_block()
        >>> block = learner.engagement.var[learner.layout.time : learner.layout.personal]
        >>> bool((mean == 0).all()), bool(np.allclose(var, block))
        (True, True)
        """
        eng = self.engagement
        key = (id(eng), eng.n)
        kept = self.__dict__.get("_time_pool")
        if kept is not None and kept[0] == key:
            return kept[1], kept[2]
        lay = self.layout
        n1 = lay.n_traits1
        lo, hi = lay.time, lay.time + 24 * n1
        prior = eng.prior_var[lo:hi].reshape(24, n1)
        s2 = self.config.hour_pool_share * prior[0]  # (per trait row)
        tau2 = prior - s2
        m = eng.mean[lo:hi].reshape(24, n1)
        v = eng.var[lo:hi].reshape(24, n1)
        lam = np.maximum(1.0 / v - 1.0 / prior, 0.0)
        eta = m / v  # (the block's prior mean is 0)
        shrink = 1.0 / (1.0 + tau2 * lam)  # each message seen through the hour's own deviation
        level_var = 1.0 / (1.0 / s2 + (lam * shrink).sum(axis=0))
        level = (eta * shrink).sum(axis=0) * level_var
        prec = 1.0 / tau2 + lam
        mean = eng.mean[lo : lay.personal].copy()
        var = eng.var[lo : lay.personal].copy()
        mean[: hi - lo] = ((level / tau2 + eta) / prec).reshape(-1)
        var[: hi - lo] = (1.0 / prec + (1.0 / (tau2 * prec)) ** 2 * level_var).reshape(-1)
        for arr in (mean, var):
            arr.flags.writeable = False
        self.__dict__["_time_pool"] = (key, mean, var)
        return mean, var

    def score_options(
        self, *, profile: Any, groups: Sequence[OptionGroup], now_ms: int, seed: int
    ) -> BulkScores:
        """Value every send time of every (campaign, channel, variant) group with one posterior draw.

        See :meth:`_score`.
        """
        res = self._score(profile=profile, groups=groups, now_ms=now_ms, seed=seed, best=False)
        assert isinstance(res, BulkScores)
        return res

    def best_options(
        self, *, profile: Any, groups: Sequence[OptionGroup], now_ms: int, seed: int
    ) -> GroupBests:
        """Each group's best send time, as :func:`~cadence.engine.decide.group_bests` picks it from
        :meth:`score_options` (the same numbers), mostly without valuing every option.

        The drawn value rises with the drawn probit score, so (with the same risk at every send
        time) a group's best time is where that score is highest: the normal CDF is needed only
        there, at the best posterior-mean score, and at any time within 1e-6 of either on the
        probit scale. When that shortcut cannot prove it finds the same option (near-ties of the
        draw on the probit scale, values near the "worth sending" threshold, a risk that depends on
        the send time, variants, the gamma customer model, send times not shared by every group),
        every option is valued as :meth:`score_options` does.
        """
        res = self._score(profile=profile, groups=groups, now_ms=now_ms, seed=seed, best=True)
        return res if isinstance(res, tuple) else group_bests(res, len(groups))

    def _score(
        self, *, profile: Any, groups: Sequence[OptionGroup], now_ms: int, seed: int, best: bool
    ) -> BulkScores | GroupBests:
        """Value every send time of every (campaign, channel, variant) group with one posterior draw.

        Returns flat arrays over every group's times: the sampled value (what decide maximises),
        the posterior-mean engagement and unsubscribe probabilities, and whether the time is
        only chosen because of exploration (its mean value is below the campaign's best).

        The linear score splits into a part per group (channel, customer, campaign, variant)
        and a part per send time (local hour x traits, hour match), so each is computed once
        and the options are their sums: two small matrix products per decision, not one per
        candidate.
        """
        cfg = self.config
        noise_e, noise_u = self._noise(seed)
        stats = self.customer(profile.customer_id)
        traits = profile.traits
        b = self._customer_vector(stats, traits, now_ms)
        t1 = self._traits1(traits)
        zone_key = zone_named(profile.timezone, "UTC").key

        # The groups' structure (channel, weight indices, campaign of each) depends only on their
        # (campaign, channel, variant) names: worked out once per shape of decision and kept.
        n_groups = len(groups)
        sig = tuple([(g[0].name, g[1], g[2]) for g in groups])
        struct = self._group_meta.get(sig)
        if struct is None:
            if len(self._group_meta) >= 4096:
                self._group_meta.clear()
            struct = self._group_meta[sig] = self._group_struct(sig)
        ch_global, camp_idx, cc_idx, arm_b, camp_of, n_camps, any_arm, camp_starts, effect_noise = struct
        # With one shared list of send times (groups of a campaign, and usually every campaign,
        # share one), an option (group k, time j) sits at k * T + j: the flat arrays are a
        # (groups x times) matrix, built by broadcasting. Otherwise the time features are made
        # once for the distinct send times of every list, and each option gathers its own.
        only = groups[0][3] if n_groups else None
        shared = n_groups > 0 and all([g[3] is only for g in groups])
        if shared:
            assert only is not None
            harm, harm_sq, hour_arr, hour_int = _time_parts(zone_key, tuple(only))
            n_times = len(only)
            rep: Any = n_times
            bounds: Sequence[int] = (
                range(0, n_groups * n_times + 1, n_times) if n_times else [0] * (n_groups + 1)
            )
        else:
            lists: dict[int, Sequence[int]] = {}
            for g in groups:
                lists.setdefault(id(g[3]), g[3])
            position: dict[int, int] = {}
            for times in lists.values():
                for t in times:
                    if t not in position:
                        position[t] = len(position)
            harm, harm_sq, hour_arr, hour_int = _time_parts(zone_key, tuple(position))
            at = {key: [position[t] for t in times] for key, times in lists.items()}
            ti_list: list[int] = []
            for g in groups:
                ti_list += at[id(g[3])]
            ti = np.array(ti_list, dtype=np.int64)
            lengths = np.array([len(g[3]) for g in groups], dtype=np.int64)
            rep = lengths
            bounds_arr = np.zeros(n_groups + 1, dtype=np.int64)
            np.cumsum(lengths, out=bounds_arr[1:])
            bounds = bounds_arr.tolist()
            group_of = np.repeat(np.arange(n_groups), lengths)
        if stats.clicks:
            resultant = math.hypot(stats.hour_cos, stats.hour_sin) / stats.clicks
            mean_angle = math.atan2(stats.hour_sin, stats.hour_cos)
            match_scale = resultant * stats.clicks / (stats.clicks + 1)
        else:
            mean_angle = match_scale = 0.0
        # Own click rate and experience per channel (what ``_personal`` gives, without the hour).
        rate_exp = self._rate_exp(stats)
        inputs = _ScoreInputs(
            stats, traits, b, t1, harm, harm_sq, hour_arr, hour_int, rate_exp, mean_angle, match_scale,
            struct, noise_e, noise_u,
        )  # fmt: skip
        parts_kern = valuation.parts_kernel()
        if parts_kern is not None and not any_arm and _parts_config(cfg):
            per_group, per_group_v, eff_sd, time_w, time_v, hour_rows = self._parts_compiled(
                parts_kern, inputs
            )
            gamma = False
        else:
            per_group, per_group_v, eff_sd, time_w, time_v, hour_rows = self._parts_numpy(inputs)
            gamma = cfg.customer_model == "gamma"

        if best and shared and n_times and not any_arm and not gamma:
            parts = (profile, now_ms, per_group, per_group_v, time_w, time_v, hour_rows, struct, noise_u)
            kern = valuation.kernel()
            if kern is not None:
                return self._best_compiled(kern, *parts, eff_sd)
            if _plain_config(cfg):
                hope = cfg.volume_optimism and per_group[0] + cfg.volume_optimism * eff_sd
                got = self._best_shared(*parts, hope)
                if got is not None:
                    return got
        # Options: a (groups x times) matrix when the groups share one list (per-group values
        # broadcast along the times), else flat arrays (per-group values repeated per time).
        if shared:
            mean = per_group[:, :, None] + time_w[:, None, :]
            var = per_group_v[:, None] + time_v[None, :]

            def per_option(x: np.ndarray) -> np.ndarray:
                return x[:, None]
        else:
            mean = per_group[:, group_of] + time_w[:, ti]
            var = per_group_v[group_of] + time_v[ti]

            def per_option(x: np.ndarray) -> np.ndarray:
                return np.repeat(x, lengths)

        # Row 0: the predictive probability Phi(mean / sqrt(beta^2 + variance)); row 1: the draw's,
        # Phi(mean / beta). In place: these arrays are this call's own.
        var += cfg.beta**2
        np.sqrt(var, out=var)
        hopeful = None
        if cfg.volume_optimism and not gamma:
            # Whether to send: the value with the customer's own effect volume_optimism sd above its mean.
            k_up = cfg.volume_optimism
            if cfg.volume_optimism_load:
                k_up /= 1.0 + cfg.volume_optimism_load * self.recent_load(profile.customer_id, now_ms)
            up = per_group[0] + k_up * eff_sd
            z_up = (up[:, None] + time_w[0]) if shared else (up[group_of] + time_w[0, ti])
            hopeful = ndtr(np.divide(z_up, var, out=z_up))
        np.divide(mean[0], var, out=mean[0])
        if cfg.beta != 1.0:
            mean[1] /= cfg.beta
        probs = ndtr(mean, out=mean)
        if gamma:
            # The customer's multiplier of the population's rate, per channel: its mean and one draw.
            lam = self._gamma_factors(stats, ch_global, noise_u[-1 - ch_global])
            probs *= lam[:, :, None] if shared else lam[:, group_of]
            np.minimum(probs, 0.999, out=probs)
        p_eng = probs[0]
        # Unsubscribe: the fatigue hazard of each channel at the customer's recent load.
        cell = self.hazard.bucket(self.recent_load(profile.customer_id, now_ms))
        ch_rates = self.hazard.rates()[ch_global, cell]
        value = cfg.click_value
        risk = per_option(cfg.unsubscribe_cost * ch_rates)
        timing = None
        if hour_rows is not None and isinstance(self.hazard, FittedHazard) and self.hazard.g != 0.0:
            # The risk of each send time: the hour's expected engagement lift scales it.
            factor = self.hazard.timing_factor(hour_rows[0] / cfg.hour_offset_scale)
            timing = factor[None, :] if shared else factor[ti]
            risk = risk * timing
        if cfg.explore_unsubscribe:
            seen = self.hazard.sends[ch_global, cell] + self.hazard.strength
            spread = np.sqrt(ch_rates * (1 - ch_rates) / seen)
            ch_draw = np.maximum(ch_rates + spread * noise_u[:n_groups], 0.0)
            draw_risk = per_option(cfg.unsubscribe_cost * ch_draw)
        else:
            draw_risk = risk
        score = (
            np.subtract(probs[1], draw_risk, out=probs[1]) if value == 1.0 else value * probs[1] - draw_risk
        )
        mean_score = (p_eng if value == 1.0 else value * p_eng) - risk
        drawn = score.copy()  # what the explanation shows beside the score the fix-ups below make
        # Whether to send at all: a draw below zero only holds a send back when the posterior
        # mean agrees; otherwise a new campaign would be withheld at random while it is unknown.
        # (With volume_optimism: whether the value is positive with the customer's effect raised.)
        worth_value = mean_score if hopeful is None else (hopeful if value == 1.0 else value * hopeful) - risk
        worth = worth_value > 0
        low = score <= 0
        low &= worth
        if np.logical_or.reduce(low, axis=None):  # (usually no option: skip the product and the copy)
            np.copyto(score, worth_value * 1e-6, where=low)
        if not cfg.explore_volume and not np.logical_and.reduce(worth, axis=None):
            # Nor does a lucky draw make a send the posterior mean says is not worth it.
            np.minimum(score, 0.0, out=score, where=~worth)

        group_best = (
            np.maximum.reduce(mean_score, axis=1)
            if shared
            else np.maximum.reduceat(mean_score, bounds_arr[:-1])
        )
        camp_best_of = _campaign_best_of(group_best, n_camps, camp_starts, camp_of)
        explored = mean_score < per_option(camp_best_of) - 1e-12
        p_uns = np.repeat(ch_rates, rep) if timing is None else (per_option(ch_rates) * timing).reshape(-1)
        score, p_eng, explored = score.reshape(-1), p_eng.reshape(-1), explored.reshape(-1)
        drawn, mean_score = drawn.reshape(-1), mean_score.reshape(-1)
        # Variants: with the campaign's minimum share, explore one variant picked at random, among
        # those with an option worth sending: forcing one that has none withheld the campaign from
        # a customer another variant suited, and taught nothing (no send, no label).
        if any_arm and any(g.campaign.learn_variants for g in groups):
            pyrng = random.Random(seed)
            forced: dict[str, str] = {}
            worth_at = worth.reshape(-1)
            for g in groups:
                camp = g.campaign
                if camp.learn_variants and camp.name not in forced:
                    names = sorted(
                        {
                            x.arm
                            for k, x in enumerate(groups)
                            if x.campaign.name == camp.name
                            and x.arm is not None
                            and worth_at[bounds[k] : bounds[k + 1]].any()
                        }
                    )
                    explore = len(names) > 1 and pyrng.random() < camp.min_explore
                    forced[camp.name] = pyrng.choice(names) if explore else ""
            for k, g in enumerate(groups):
                pick = forced.get(g.campaign.name)
                if pick:
                    lo, hi = bounds[k], bounds[k + 1]
                    if g.arm != pick:
                        score[lo:hi] = -np.inf
                    else:
                        explored[lo:hi] = True
        res = BulkScores(
            bounds=bounds,
            score=score,
            engagement=p_eng,
            unsubscribe=p_uns,
            explored=explored,
            draw=drawn,
            mean=mean_score,
        )
        return group_bests(res, n_groups) if best else res

    def _parts_numpy(
        self, inputs: _ScoreInputs
    ) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray, np.ndarray, np.ndarray | None]:
        """The score's per-group and per-time parts, with numpy: see :meth:`_score`.

        Returns the groups' posterior-mean and drawn linear scores (2 x groups) and variances,
        the sd of the customer's own effect in the draw (per group, or one number at the prior;
        None with the gamma customer model, applied to the probabilities instead), the send
        times' part (2 x times: mean, draw) and variance, and the hour preference's rows (None
        without ``hour_model``).
        """
        lay = self.layout
        cfg = self.config
        stats, traits, b, t1, harm, harm_sq, hour_arr, hour_int, rate_exp = inputs[:9]
        mean_angle, match_scale, struct, noise_e, noise_u = inputs[9:]
        ch_global, camp_idx, cc_idx, arm_b, _, _, any_arm, _, effect_noise = struct
        match = np.cos(TWO_PI * hour_arr / 24 - mean_angle) * match_scale if stats.clicks else None
        # Weights: posterior mean and one draw (rows 0, 1), and the variances. The channel, time,
        # personal, campaign and campaign-channel blocks are contiguous: one draw covers them.
        eng = self.engagement
        hi = lay.arm
        w = np.empty((2, hi))
        w[0] = eng.mean[:hi]
        sd = eng.sd()
        if cfg.time_draw or not cfg.probit_hours:
            np.multiply(sd[:hi], noise_e[:hi], out=w[1])
            w[1] += w[0]
        else:
            # Row 1 of the hour x trait block (three quarters of the weights) is never read without
            # time_draw (the time part uses row 0): draw only the blocks before and after it.
            lo, up = lay.time, lay.personal
            np.multiply(sd[:lo], noise_e[:lo], out=w[1, :lo])
            w[1, :lo] += w[0, :lo]
            np.multiply(sd[up:hi], noise_e[up:hi], out=w[1, up:])
            w[1, up:] += w[0, up:]
        v = eng.var
        wp = w[:, lay.personal : lay.personal + lay.n_personal]
        vp = v[lay.personal : lay.personal + lay.n_personal]
        # Per channel: the customer block and the own rate and experience (gathered per group below).
        chan_w = w[:, lay.channel : lay.time].reshape(2, N_CHANNELS, lay.n_customer) @ b
        chan_w += wp[:, ::2] @ rate_exp.T
        chan_v = v[lay.channel : lay.time].reshape(N_CHANNELS, lay.n_customer) @ (b * b)
        chan_v += (rate_exp * rate_exp) @ vp[::2]
        if cfg.probit_hours:
            if cfg.hour_onehot:
                t_lo, t_harm, t_sq = lay.time, harm, harm_sq
            else:  # the one-hot hour's weights are never learned: leave them (and their prior variance) out
                t_lo, t_harm, t_sq = lay.time + 24 * lay.n_traits1, harm[:, 24:], harm_sq[:, 24:]
            n_t = (lay.personal - t_lo) // lay.n_traits1
            if cfg.hour_pool and cfg.hour_onehot:
                # The one-hot hour weights partially pooled per trait row (the raw ones stay learned).
                t_mean, t_var = self._pooled_time_block()
                t_w: np.ndarray = t_mean
                if cfg.time_draw:
                    t_w = np.stack((t_mean, t_mean + np.sqrt(t_var) * noise_e[t_lo : lay.personal]))
            else:
                t_w = w[:, t_lo : lay.personal] if cfg.time_draw else w[0, t_lo : lay.personal]
                t_var = v[t_lo : lay.personal]
            if cfg.time_draw:
                time_w = (t_w.reshape(2, n_t, lay.n_traits1) @ t1) @ t_harm.T
            else:  # both rows hold the posterior mean: one product, shown twice
                row = (t_w.reshape(n_t, lay.n_traits1) @ t1) @ t_harm.T
                time_w = np.empty((2, len(hour_arr)))
                time_w[0] = row
                time_w[1] = row
            time_v = (t_var.reshape(n_t, lay.n_traits1) @ t1) @ t_sq.T
            if match is not None:  # (no clicks yet: the hour-match feature is 0)
                time_w = time_w + wp[:, 1:2] * match
                time_v = time_v + vp[1] * match * match
        else:
            time_w, time_v = np.zeros((2, len(hour_arr))), np.zeros(len(hour_arr))
        hour_rows = None
        if cfg.hour_model:
            # The customer's preferred hour: the posterior's expected lift, and one draw of the hour.
            buckets = self._trait_buckets(traits)
            hour_rows = self._hour_offset_rows(
                stats,
                buckets,
                hour_arr,
                float(ndtr(noise_u[-1 - N_CHANNELS])) if cfg.hour_explore else 0.0,  # only read then
                cfg.hour_draw_scale * noise_u[64:88],
                hour_int,
            )
            time_w += hour_rows
        per_group = chan_w[:, ch_global] + w[:, camp_idx] + w[:, cc_idx]
        per_group_v = chan_v[ch_global] + v[camp_idx] + v[cc_idx]
        if any_arm:
            has_arm = arm_b >= 0
            arm_rows = np.maximum(arm_b, 0)
            arm_w = np.stack((eng.mean[lay.arm :], eng.sample(noise_e)[lay.arm :]))
            arm_w = arm_w.reshape(2, ARM_BUCKETS, lay.n_traits1) @ t1
            arm_v = v[lay.arm : lay.size].reshape(ARM_BUCKETS, lay.n_traits1) @ t1
            per_group = per_group + np.where(has_arm, arm_w[:, arm_rows], 0.0)
            per_group_v = per_group_v + np.where(has_arm, arm_v[arm_rows], 0.0)
        # The customer's own effect on each channel: its mean, one draw, its variance.
        eff = stats.effect
        gamma = cfg.customer_model == "gamma"
        if gamma:  # applied to the probabilities below
            pass
        elif eff is not None:
            eff_mean, eff_var = eff[0][ch_global], eff[1][ch_global]
            per_group[0] += eff_mean
            eff_sd = np.sqrt(eff_var)
            per_group[1] += eff_mean + eff_sd * noise_u[effect_noise]
            per_group_v += eff_var
        else:  # still the prior: the same variance on every channel
            eff_sd = math.sqrt(cfg.customer_channel_var)
            per_group[1] += eff_sd * noise_u[effect_noise]
            per_group_v += cfg.customer_channel_var
        return per_group, per_group_v, (None if gamma else eff_sd), time_w, time_v, hour_rows

    def _parts_compiled(
        self, kern: Callable[..., Any], inputs: _ScoreInputs
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`_parts_numpy` by the compiled :func:`cadence.engine.valuation.score_parts`.

        For the configurations :func:`_parts_config` accepts and groups without variants; the
        same formulas, its sums in another order (the last bits can differ from numpy's).
        """
        cfg = self.config
        eng = self.engagement
        stats, traits, b, t1, harm, harm_sq, hour_arr, hour_int, rate_exp = inputs[:9]
        mean_angle, match_scale, struct, noise_e, noise_u = inputs[9:]
        ch_global, camp_idx, cc_idx, _, _, _, _, _, effect_noise = struct
        n_groups, n_times = len(ch_global), len(hour_arr)
        hp = self.hours
        if cfg.hour_model:
            lp, spread = hp.prior_parts(self._trait_buckets(traits))
            hour_rows = np.empty((2, n_times))
        else:
            lp = spread = _ZERO24
            hour_rows = _NO_ROWS
        loglik = stats.hour_loglik if stats.hour_loglik is not None else _NOTHING
        eff = stats.effect if stats.effect is not None else _NO_EFFECT
        per_group = np.empty((2, n_groups))
        per_group_v = np.empty(n_groups)
        eff_sd = np.empty(n_groups)
        time_w = np.empty((2, n_times))
        time_v = np.empty(n_times)
        kern(
            eng.mean, eng.sd(), eng.var, noise_e, noise_u,
            b, t1, harm, harm_sq, 0 if cfg.hour_onehot else 24, rate_exp,
            hour_arr, mean_angle, match_scale,
            lp, spread, float(cfg.hour_draw_scale), loglik, cfg.hour_pop_draw, hp.F.T, hp.reference,
            hour_int, float(cfg.hour_offset_scale),
            ch_global, camp_idx, cc_idx, effect_noise, eff, float(cfg.customer_channel_var),
            _LAYOUT_ARRAY,
            per_group, per_group_v, eff_sd, time_w, time_v, hour_rows,
        )  # fmt: skip
        return per_group, per_group_v, eff_sd, time_w, time_v, (hour_rows if cfg.hour_model else None)

    def _best_compiled(
        self,
        kern: Callable[..., Any],
        profile: Any,
        now_ms: int,
        per_group: np.ndarray,
        per_group_v: np.ndarray,
        time_w: np.ndarray,
        time_v: np.ndarray,
        hour_rows: np.ndarray | None,
        struct: _GroupStruct,
        noise_u: np.ndarray,
        eff_sd: Any,
    ) -> GroupBests:
        """:meth:`best_options` for groups sharing one list of send times, valued by the compiled loop.

        The per-group and per-time parts are :meth:`_score`'s; :func:`cadence.engine.valuation.best_of_groups`
        does the rest of the full valuation, option by option, with the same operations on the
        same numbers (bit-identical to :func:`~cadence.engine.decide.group_bests` over
        :meth:`score_options`).
        """
        cfg = self.config
        ch_global, _, _, _, camp_of, n_camps, _, _, _ = struct
        n_groups = per_group.shape[1]
        load = self.recent_load(profile.customer_id, now_ms)
        cell = self.hazard.bucket(load)
        ch_rates = self.hazard.rates()[ch_global, cell]
        risk_g = cfg.unsubscribe_cost * ch_rates
        hazard = self.hazard
        timed = hour_rows is not None and isinstance(hazard, FittedHazard) and hazard.g != 0.0
        if timed and hour_rows is not None and isinstance(hazard, FittedHazard):
            timing = hazard.timing_factor(hour_rows[0] / cfg.hour_offset_scale)
        else:
            timing = _NOTHING
        drawn = cfg.explore_unsubscribe
        if drawn:
            seen = self.hazard.sends[ch_global, cell] + self.hazard.strength
            spread = np.sqrt(ch_rates * (1 - ch_rates) / seen)
            draw_g = cfg.unsubscribe_cost * np.maximum(ch_rates + spread * noise_u[:n_groups], 0.0)
        else:
            draw_g = _NOTHING
        hope = bool(cfg.volume_optimism)
        if hope:
            k_up = cfg.volume_optimism
            if cfg.volume_optimism_load:
                k_up /= 1.0 + cfg.volume_optimism_load * load
            up = per_group[0] + k_up * eff_sd
        else:
            up = _NOTHING
        at = np.empty(n_groups, dtype=np.int64)
        score = np.empty(n_groups)
        eng = np.empty(n_groups)
        uns = np.empty(n_groups)
        explored = np.empty(n_groups, dtype=bool)
        draws = np.empty(n_groups)
        means = np.empty(n_groups)
        kern(
            per_group[0],
            per_group[1],
            per_group_v,
            time_w[0],
            time_w[1],
            time_v,
            up,
            risk_g,
            timing,
            draw_g,
            ch_rates,
            camp_of,
            n_camps,
            float(cfg.beta**2),
            float(cfg.beta),
            float(cfg.click_value),
            hope,
            timed,
            drawn,
            cfg.explore_volume,
            valuation.TABLE,
            at,
            score,
            eng,
            uns,
            explored,
            draws,
            means,
        )
        return (
            at.tolist(),
            score.tolist(),
            eng.tolist(),
            uns.tolist(),
            explored.tolist(),
            draws.tolist(),
            means.tolist(),
        )

    def _best_shared(
        self,
        profile: Any,
        now_ms: int,
        per_group: np.ndarray,
        per_group_v: np.ndarray,
        time_w: np.ndarray,
        time_v: np.ndarray,
        hour_rows: np.ndarray | None,
        struct: _GroupStruct,
        noise_u: np.ndarray,
        up: Any,
    ) -> GroupBests | None:
        """:meth:`best_options` for groups sharing one list of send times; None when it cannot prove its answer.

        Every option's probit scores are computed as in :meth:`_score` (row 0: the posterior
        mean over its predictive spread, row 1: the draw), the same operations on the same
        numbers, so the scores it evaluates are bit for bit those of the full path. With a
        risk per group (not per send time) and a positive click value, a group's drawn value
        ``Phi(z1) - risk`` rises with ``z1`` and its mean value with ``z0``; ``Phi`` is needed at
        the highest ``z1`` (the chosen time) and the highest ``z0`` (the group's best mean
        value). That is exact when every other time's score is more than 1e-6 below on the
        probit scale (below 5, a gap of 1e-6 is over 1e-12 in probability, far above rounding)
        and the chosen time's drawn value is well above the score fix-ups' 1e-6 scale, or
        every drawn value is at or below zero. Mean scores within 1e-6 of a group's best but
        not equal to it (rounding in the time features) are all valued. Any group where that
        does not hold sends the whole call down the full path.
        """
        cfg = self.config
        ch_global, _, _, _, camp_of, n_camps, _, camp_starts, _ = struct
        # Unsubscribe: the fatigue hazard of each channel at the customer's recent load (as _score).
        cell = self.hazard.bucket(self.recent_load(profile.customer_id, now_ms))
        ch_rates = self.hazard.rates()[ch_global, cell]
        value = cfg.click_value
        if value <= 0 or (
            hour_rows is not None and isinstance(self.hazard, FittedHazard) and self.hazard.g != 0.0
        ):
            return None  # a risk per send time, or a value that does not rise with the draw
        n_groups = per_group.shape[1]
        n_times = time_w.shape[1]
        z = per_group[:, :, None] + time_w[:, None, :]
        spread = per_group_v[:, None] + time_v[None, :]
        spread += cfg.beta**2
        np.sqrt(spread, out=spread)
        np.divide(z[0], spread, out=z[0])
        if cfg.beta != 1.0:
            z[1] /= cfg.beta
        top = np.maximum.reduce(z, axis=2)  # (2, groups): the best mean and drawn score of each group
        if not np.maximum.reduce(top, axis=None) < 5.0:  # (NaN fails too)
            return None
        near = z >= (top - 1e-6)[:, :, None]
        if np.count_nonzero(near[1]) != n_groups:
            return None  # another time within 1e-6 of a group's best draw
        # A different mean score within 1e-6 of a group's best (exact ties are the same number):
        # then every mean score that near is valued (below).
        mixed = np.logical_or.reduce(near[0] & (z[0] != top[0][:, None]), axis=None)
        first = z.argmax(axis=2)  # (2, groups): the first time with the best mean, and with the best draw
        at = first[1]
        flat = at + np.arange(0, n_groups * n_times, n_times)
        args = np.concatenate((top[0], z[0].reshape(-1).take(flat), top[1]))
        probs = ndtr(args, out=args)
        p_top, p_eng, p_draw = probs[:n_groups], probs[n_groups : 2 * n_groups], probs[2 * n_groups :]
        risk = cfg.unsubscribe_cost * ch_rates
        if cfg.explore_unsubscribe:
            seen = self.hazard.sends[ch_global, cell] + self.hazard.strength
            spread_r = np.sqrt(ch_rates * (1 - ch_rates) / seen)
            draw_risk = cfg.unsubscribe_cost * np.maximum(ch_rates + spread_r * noise_u[:n_groups], 0.0)
        else:
            draw_risk = risk
        if value == 1.0:
            score, mean_score, group_best = p_draw - draw_risk, p_eng - risk, p_top - risk
        else:
            score = value * p_draw - draw_risk
            mean_score, group_best = value * p_eng - risk, value * p_top - risk
        if cfg.volume_optimism:
            z_up = (up + time_w[0].take(at)) / spread.reshape(-1).take(flat)
            hopeful = ndtr(z_up, out=z_up)
            worth_value = (hopeful if value == 1.0 else value * hopeful) - risk
        else:
            worth_value = mean_score
        # Per group, one of three cases, else the full path:
        # - the best draw's value is well above the fix-ups' scale (at most 1e-6 of a value no
        #   larger than click_value) and worth sending (or explore_volume): it is the best;
        # - every drawn value is at or below zero (without volume_optimism, whose "worth" is not
        #   the mean value): the times worth sending score 1e-6 of their mean value, so the time
        #   with the best mean wins when that is positive ("low"), and the best draw otherwise.
        drawn = None
        high = score > 2e-6 * max(1.0, value)
        if not cfg.explore_volume:
            high &= worth_value > 0
        if cfg.volume_optimism:
            if mixed or not np.logical_and.reduce(high, axis=None):
                return None
            low = None
        else:
            nonpos = score <= 0
            if not np.logical_and.reduce(high | nonpos, axis=None):
                return None
            if mixed:
                # The mean scores near each group's best, valued: the best of them, and the first
                # time with the best 1e-6 share of it (the score of a "low" group).
                idx = np.flatnonzero(near[0])
                rows = idx // n_times
                p_near = ndtr(z[0].reshape(-1).take(idx))
                ms_near = (p_near if value == 1.0 else value * p_near) - risk[rows]
                starts = np.searchsorted(idx, np.arange(0, n_groups * n_times, n_times))
                group_best = np.maximum.reduceat(ms_near, starts)
                low_near = ms_near * 1e-6
                hit = np.flatnonzero(low_near >= np.maximum.reduceat(low_near, starts)[rows])
                pos = hit[np.searchsorted(hit, starts)]
                best_at, best_low = idx[pos] - rows[pos] * n_times, low_near[pos]
                best_p, best_mean = p_near[pos], ms_near[pos]
            else:
                best_at, best_low = first[0], group_best * 1e-6
                best_p, best_mean = p_top, group_best
            low = nonpos & (group_best > 0)
            if np.logical_or.reduce(low, axis=None):
                # A low group is sent at its best mean value's time: its drawn value there, too.
                rows = np.flatnonzero(low)
                p_low = ndtr(z[1].reshape(-1).take(rows * n_times + best_at[rows]))
                drawn = score.copy()
                drawn[rows] = (p_low if value == 1.0 else value * p_low) - draw_risk[rows]
                at = np.where(low, best_at, at)
                score = np.where(low, best_low, score)
                p_eng = np.where(low, best_p, p_eng)
                mean_score = np.where(low, best_mean, mean_score)
        camp_best_of = _campaign_best_of(group_best, n_camps, camp_starts, camp_of)
        explored = mean_score < camp_best_of - 1e-12
        return (
            at.tolist(),
            score.tolist(),
            p_eng.tolist(),
            ch_rates.tolist(),
            explored.tolist(),
            (score if drawn is None else drawn).tolist(),
            mean_score.tolist(),
        )

    def score(
        self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> list[Candidate]:
        """The :class:`~cadence.engine.decision.Scorer` protocol, over ready-made candidates."""
        stubs: dict[str, Campaign] = {}
        groups = []
        for c in candidates:
            camp = stubs.get(c.campaign)
            if camp is None:
                camp = stubs[c.campaign] = Campaign(
                    name=c.campaign,
                    title=c.campaign,
                    priority=0,
                    audience=None,
                    template=_NO_TEMPLATE,
                    channels=_NO_CH,
                )
            groups.append(OptionGroup(camp, c.channel, c.arm, (c.send_at_ms,)))
        if not groups:
            return []
        res = self.score_options(profile=profile, groups=groups, now_ms=now_ms, seed=seed)
        return [
            replace(
                c,
                score=float(res.score[i]),
                engagement=float(res.engagement[i]),
                unsubscribe=float(res.unsubscribe[i]),
                explored=bool(res.explored[i]),
                draw=None if res.draw is None else float(res.draw[i]),
                mean=None if res.mean is None else float(res.mean[i]),
            )
            for i, c in enumerate(candidates)
        ]

    # -- learning -------------------------------------------------------------------------------

    def record_decision(
        self,
        *,
        decision_id: str,
        customer_id: int,
        traits: Mapping[str, Any],
        zone: str | None,
        campaign: str,
        channel: str,
        send_at_ms: int,
        arm: str | None,
        now_ms: int,
    ) -> Pending:
        """Remember a committed decision's features so its feedback can be learned from."""
        pending = self.pending_decision(
            customer_id=customer_id,
            traits=traits,
            zone=zone,
            campaign=campaign,
            channel=channel,
            send_at_ms=send_at_ms,
            arm=arm,
            now_ms=now_ms,
        )
        self.remember(decision_id, pending)
        return pending

    def pending_decision(
        self,
        *,
        customer_id: int,
        traits: Mapping[str, Any],
        zone: str | None,
        campaign: str,
        channel: str,
        send_at_ms: int,
        arm: str | None,
        now_ms: int,
    ) -> Pending:
        """A decision's features as :meth:`record_decision` remembers them, not remembered yet.

        A caller that records the decision in a transaction remembers it (:meth:`remember`)
        only once that transaction committed: a rolled-back decision leaves no pending label.
        """
        idx, val = self.features(
            customer_id=customer_id,
            traits=traits,
            zone=zone,
            campaign=campaign,
            channel=channel,
            send_at_ms=send_at_ms,
            arm=arm,
            now_ms=now_ms,
        )
        pending = Pending(
            customer_id=customer_id,
            idx=idx,
            val=val,
            sent_ms=send_at_ms,
            channel=channel,
            campaign=campaign,
            arm=arm,
            load=self.recent_load(customer_id, now_ms),
            position=self.position,
        )
        if self.config.hour_model:
            local = local_datetime(send_at_ms, zone_named(zone, "UTC"))
            stats = self.customer(customer_id)
            buckets = tuple(self._trait_buckets(traits))
            lift = float(self.hours.lift(self.hour_posterior(stats, buckets))[local.hour])
            pending.hour, pending.buckets = local.hour, buckets
            pending.offset = self.config.hour_offset_scale * math.log(lift)
            extra = (self.effect(customer_id), CHANNEL_INDEX.get(channel, 0))
            p = self.engagement.predict(idx, val, extra, pending.offset)
            pending.rate = min(max(p / (lift * self.hours.reference), 1e-3), 0.5)
        return pending

    def _heap(self) -> list[tuple[int, str]]:
        if not isinstance(self._horizon, list):  # a snapshot from before the heap kept a deque
            self._horizon = list(self._horizon)
            heapq.heapify(self._horizon)
        return self._horizon

    def remember(self, decision_id: str, pending: Pending) -> None:
        """Register a decision whose features were computed when it was made (see :meth:`Pending.stored`)."""
        self.pending[decision_id] = pending
        self.customer(pending.customer_id)  # a customer with a pending decision has stats: see absorb
        index = self.__dict__.get("_pending_of")
        if index is not None:
            index.setdefault(pending.customer_id, []).append(decision_id)
            self.__dict__["_pending_of_size"] += 1
        heapq.heappush(self._heap(), (pending.sent_ms + self._first_label_ms(), decision_id))

    def _first_label_ms(self) -> int:
        """How long after a send its first label is learned: the label delay, or the horizon."""
        delay, horizon = self.config.label_delay_ms, self.config.horizon_ms
        return horizon if delay is None or delay >= horizon else max(0, delay)

    def observe(self, *, decision_id: str, kind: Feedback, ts_ms: int, zone: str | None = None) -> None:
        """Learn from one feedback event joined to its decision (unknown decisions are ignored)."""
        self.advance(ts_ms)
        p = self.pending.get(decision_id)
        if p is None:
            return
        stats = self.customer(p.customer_id)
        if kind in (Feedback.SENT, Feedback.DELIVERED):
            if not stats.sends or stats.sends[-1] != p.sent_ms:
                stats.sends.append(ts_ms)
                stats.channel_sends[p.channel] = stats.channel_sends.get(p.channel, 0) + 1
        elif kind in self.config.engagement_events and not p.engaged:
            p.engaged = True
            if p.learned:
                self._late(p, engaged=True)
            stats.channel_clicks[p.channel] = stats.channel_clicks.get(p.channel, 0) + 1
            local = local_datetime(p.sent_ms, zone_named(zone, "UTC"))
            angle = TWO_PI * (local.hour + local.minute / 60) / 24
            stats.hour_cos += math.cos(angle)
            stats.hour_sin += math.sin(angle)
            stats.clicks += 1
            stats.last_click_ms = ts_ms
        elif kind is Feedback.OPENED and not p.opened and kind not in self.config.engagement_events:
            p.opened = True
            self.open_channels.add(p.channel)
            if p.open_counted:  # after the provisional label, which counted the send as not opened
                if p.engaged:  # its click counted where the customer read: the open says it now
                    stats.hour_loglik = np.asarray(stats.hour_loglik - self.hours.logF[p.hour])
                self._count_open(p, sent=0, opened=1)
        elif kind in (Feedback.UNSUBSCRIBED, Feedback.SPAM_REPORT) and not p.unsubscribed:
            p.unsubscribed = True
            if p.learned:
                self._late(p, engaged=False)
        elif kind in (Feedback.BOUNCED, Feedback.FAILED):
            self.pending.pop(decision_id, None)  # never delivered: teaches nothing about the customer

    def advance(self, now_ms: int) -> None:
        """Learn every pending decision whose horizon has passed: a click by then is a yes, none a no.

        Every label is learned at its decision's horizon, positives included, so labels reach
        the models in the order of the decisions. (Learning clicks as they arrived and the
        missing clicks a horizon later fed each day's positives a day before its negatives;
        the diagonal posterior then swung high, predicting about 0.55 for sends that were
        clicked 4.6% of the time.)
        """
        if now_ms > self.clock_ms:
            self.clock_ms = now_ms
        horizon = self._heap()
        full = self.config.horizon_ms
        while horizon and horizon[0][0] <= now_ms:
            due, decision_id = heapq.heappop(horizon)
            p = self.pending.get(decision_id)
            if p is None:
                continue
            if p.learned:  # the horizon of a provisionally learned send: nothing more can change it
                del self.pending[decision_id]
                continue
            self._learn(self.engagement, "engagement", p, p.engaged)
            self._learn(self.unsubscribe, "unsubscribe", p, p.unsubscribed)
            if due < p.sent_ms + full:  # learned at the label delay: late feedback may still correct it
                p.learned = True
                heapq.heappush(horizon, (p.sent_ms + full, decision_id))
            else:
                del self.pending[decision_id]

    def _gamma_factors(self, stats: CustomerStats, channels: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The customer's Gamma-Poisson multiplier of the population's click rate, per channel: (mean, draw).

        The multiplier ``lam`` on a channel has the posterior ``Gamma(a + clicks, a + expected
        clicks)``, the expected clicks being the population model's for the customer's labelled
        sends there. The draw is the Wilson-Hilferty transform of the standard normal ``z``
        (one per channel). Shape (2, len(channels)).
        """
        a = self.config.customer_gamma_shape
        if stats.gamma is None:
            alpha = np.full(len(channels), a)
            beta = alpha
        else:
            alpha = a + stats.gamma[0][channels]
            beta = a + stats.gamma[1][channels]
        c = 1.0 / (9.0 * alpha)
        out = np.empty((2, len(channels)))
        np.divide(alpha, beta, out=out[0])
        out[1] = np.maximum(1.0 - c + z * np.sqrt(c), 0.05) ** 3 * out[0]
        return out

    def _gamma_offset(self, stats: CustomerStats, ci: int, p_pop: float) -> float:
        """The probit offset that turns the population's rate ``p_pop`` into the customer's (mean multiplier)."""
        a = self.config.customer_gamma_shape
        if stats.gamma is None:
            return 0.0
        lam = (a + stats.gamma[0, ci]) / (a + stats.gamma[1, ci])
        p = min(max(p_pop, 1e-6), 0.999)
        return float(_ndtri(min(lam * p, 0.999)) - _ndtri(p))

    def _late(self, p: Pending, *, engaged: bool) -> None:
        """A click (``engaged``) or unsubscribe after the send's provisional "no" was learned.

        The count models are corrected exactly (one more click or unsubscribe, no more
        sends); the engagement regression learns the positive on top of the negative it
        already learned (the "fake negative" scheme: it then sees ``p / (1 + p)`` for a rate
        ``p``, a small bias at the rates of marketing messages, and only for late clicks).
        """
        if not engaged:
            fit = p.offset / self.config.hour_offset_scale if p.hour >= 0 else 0.0
            self.hazard.late_unsubscribe(CHANNEL_INDEX.get(p.channel, 0), p.load, fit)
            self.unsubscribe.learn(p.idx, p.val, True)
            return
        if self.config.customer_model == "gamma":
            stats = self.customer(p.customer_id)
            ci = CHANNEL_INDEX.get(p.channel, 0)
            base = self.engagement.predict(p.idx, p.val, None, p.offset)
            self.engagement.learn(p.idx, p.val, True, None, p.offset + self._gamma_offset(stats, ci, base))
            if stats.gamma is not None:
                stats.gamma[0, ci] += 1
        else:
            extra = (self.effect(p.customer_id), CHANNEL_INDEX.get(p.channel, 0))
            self.engagement.learn(p.idx, p.val, True, extra, p.offset)
        if p.hour >= 0:
            stats = self.customer(p.customer_id)
            hp = self.hours
            loglik = stats.hour_loglik if stats.hour_loglik is not None else _ZERO24
            # Undo the miss the provisional label counted, then count the click (unless its open,
            # counted, already says where the customer read).
            miss = hp.miss_weight * np.log1p(-p.rate * hp.F[p.hour])
            if p.open_counted and p.opened:
                stats.hour_loglik = np.asarray(loglik - miss)
            else:
                stats.hour_loglik = np.asarray(hp.update(loglik, p.hour, True, p.rate) - miss)
            hp.clicks[[0, *(1 + b for b in p.buckets)], p.hour] += 1

    def _learn(self, model: ProbitModel, name: str, p: Pending, label: bool) -> None:
        if name == "unsubscribe":
            # Scored by the fatigue hazard; the trait regression keeps learning alongside it.
            ci = CHANNEL_INDEX.get(p.channel, 0)
            prob = float(self.hazard.rates()[ci, self.hazard.bucket(p.load)])
            fit = p.offset / self.config.hour_offset_scale if p.hour >= 0 else 0.0
            self.hazard.learn(ci, p.load, label, fit)
            self._quality_auc("unsubscribe_auc", label, prob)
            model.learn(p.idx, p.val, label)
            self.labels += 1
            return
        if self.config.customer_model == "gamma":
            stats = self.customer(p.customer_id)
            ci = CHANNEL_INDEX.get(p.channel, 0)
            base = model.predict(p.idx, p.val, None, p.offset)  # the population's expectation
            offset = p.offset + self._gamma_offset(stats, ci, base)
            prob = model.predict(p.idx, p.val, None, offset)
            self._quality_auc(f"{name}_auc", label, prob)
            self.quality["engagement_logloss"].update(label, prob)
            model.learn(p.idx, p.val, label, None, offset)
            if stats.gamma is None:
                stats.gamma = np.zeros((2, N_CHANNELS))
            stats.gamma[0, ci] += label
            stats.gamma[1, ci] += base
        else:
            extra = (self.effect(p.customer_id), CHANNEL_INDEX.get(p.channel, 0))
            prob = model.predict(p.idx, p.val, extra, p.offset)
            self._quality_auc(f"{name}_auc", label, prob)
            self.quality["engagement_logloss"].update(label, prob)
            model.learn(p.idx, p.val, label, extra, p.offset)
        if p.hour >= 0:
            stats = self.customer(p.customer_id)
            counted = self._opens_counted(p)
            if not (label and counted and p.opened):  # an open counted says what its click would
                loglik = stats.hour_loglik if stats.hour_loglik is not None else _ZERO24
                stats.hour_loglik = self.hours.update(loglik, p.hour, label, p.rate)
            self.hours.learn(p.buckets, p.hour, label)
            if counted:
                p.open_counted = True
                self._count_open(p, sent=1, opened=int(p.opened))
        self.labels += 1

    def _opens_counted(self, p: Pending) -> bool:
        """True when ``p``'s send counts in its customer's opens: its channel reports opens, and they
        are weighed (not where opens are engagement, counted as clicks are)."""
        return bool(self.config.hour_open_weight) and p.channel in self.open_channels

    def _count_open(self, p: Pending, *, sent: int, opened: int) -> None:
        """Count a labelled send of ``p`` (``sent``) and its open (``opened``) in its customer's hour
        likelihood (``p`` is one :meth:`_opens_counted` admitted, sent at a known hour).

        Only sends on a channel some customer has opened a message on count (the channels that
        report opens), from the first open there on. Opens say when the customer reads, not what
        a send is worth: the engagement models learn clicks, and the population's hour curves
        count clicks.
        """
        stats = self.customer(p.customer_id)
        counts = stats.open_counts
        loglik = stats.hour_loglik if stats.hour_loglik is not None else _ZERO24
        if counts is None:
            counts = stats.open_counts = np.zeros((2, 24), dtype=np.float32)
        else:
            loglik = loglik - self._open_part(counts)
        counts[0, p.hour] += sent
        counts[1, p.hour] += opened
        stats.hour_loglik = np.asarray(loglik + self._open_part(counts))

    def _open_part(self, counts: np.ndarray) -> np.ndarray:
        """The part of a customer's ``hour_loglik`` their ``open_counts`` make (the same numbers
        for the same counts, so that it can be taken out again exactly when they change)."""
        return np.asarray(self.config.hour_open_weight * self.hours.open_loglik(counts))

    def _quality_auc(self, key: str, label: bool, prob: float) -> None:
        self.quality[key].update(label, prob)
        if self.quality_labels is not None:
            self.quality_labels[key].append(label)

    def recent_quality(self) -> dict[str, float | None]:
        """Rolling ROC AUC and log loss over the last ``quality_window`` labels; None where undefined.

        An AUC is undefined until its window holds a positive and a negative label (river reads
        0.0 there), a log loss until it holds a label. A learner stored before the windows' labels
        were kept reads an AUC of exactly 0.0 as undefined.

        >>> DecisionLearner().recent_quality()
        {'engagement_auc': None, 'engagement_logloss': None, 'unsubscribe_auc': None}
        """
        out: dict[str, float | None] = {}
        kept = self.quality_labels
        for key, metric in self.quality.items():
            value: float | None = round(float(metric.get()), 4)
            if key.endswith("_auc"):
                labels = kept[key] if kept is not None else None
                if (value == 0.0) if labels is None else not 0 < sum(labels) < len(labels):
                    value = None
            elif (not kept["engagement_auc"]) if kept is not None else not self.labels:
                value = None
            out[key] = value
        return out


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Standard normals for posterior draws, the same in every process (see ``_noise``).

    Made once per process and size (about 0.1 s) and shared, read-only, by every learner: a
    snapshot loaded or rolled back in a running service does not make the next decision wait.
    """
    bank = np.random.default_rng(20260101).standard_normal((509, size))
    bank.flags.writeable = False
    return bank


#: Time features by local minute of the day and weekend flag (row ``minute * 2 + weekend``),
#: filled from :func:`_time_code` as minutes are first seen; ``_TIME_SEEN`` marks the filled rows.
_TIME_TABLE = np.zeros((24 * 60 * 2, 27))
_TIME_SEEN = [False] * (24 * 60 * 2)
#: The fractional local hour (hour + minute / 60) of each minute of the day.
_MINUTE_HOURS = np.array([m // 60 + (m % 60) / 60 for m in range(24 * 60)])
#: Per time-table row: the fractional local hour, and the whole local hour.
_ROW_HOURS = np.repeat(_MINUTE_HOURS, 2)
_ROW_WHOLE = np.repeat(np.arange(24 * 60, dtype=np.int64) // 60, 2)
#: The time-table row of a top-of-hour instant, by zone name, then epoch ms; see :func:`_time_parts`.
_INSTANT_ROW: dict[str, dict[int, int]] = {}


@lru_cache(maxsize=1024)
def _time_parts(zone: str, times: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The time features of ``times`` (one row per send time), those rows squared, and the
    fractional and whole local hours (0..23), as read-only arrays.

    A decision's slots are the next hours, so consecutive decisions in a zone ask for
    nearly the same instants: each top-of-hour instant's table row is kept per zone, so a
    window shifted by an hour (the next decision's) costs one new instant, not a new pass
    over every send time. (A decision's own instant, new every time, is worked out and not
    kept: kept, they grew a process by 13 MB a zone every 100,000 decisions.) Whole answers
    are memoised too, for decisions at one instant (a push, a simulated hour: one window per
    zone); a decision at its own time never asks for the same window twice, so that memo is
    kept small (about 11 KB an entry: at 8,192 entries it held 100 MB of a served process).
    Local times come from the per-instant UTC offsets (exact across DST changes), and the
    rows from a table by local minute of the day.

    >>> harm, sq, hours, whole = _time_parts("UTC", (0, 5_400_000))
    >>> whole.tolist(), hours.tolist(), bool((sq == harm * harm).all())
    ([0, 1], [0.0, 1.5], True)
    >>> tuple(harm[1]) == _time_code(1.5, False)  # 1970-01-01 was a Thursday
    True
    """
    known = _INSTANT_ROW.get(zone)
    if known is None:
        known = _INSTANT_ROW[zone] = {}
    get = known.get
    rows = [get(t, -1) for t in times]
    if -1 in rows:
        for k, t in enumerate(times):
            if rows[k] >= 0:
                continue
            if len(known) >= 200_000:
                known.clear()
            loc = local_ms((t,), zone_named(zone, "UTC"))[0]
            minute = (loc % DAY_MS) // 60_000
            row = minute * 2 + ((loc // DAY_MS + 3) % 7 >= 5)  # 1970-01-01: a Thursday
            if t % HOUR_MS == 0:  # a send time: asked for again and again (a decision's own instant is not)
                known[t] = row
            if not _TIME_SEEN[row]:
                _TIME_TABLE[row] = _time_code(minute // 60 + (minute % 60) / 60, bool(row % 2))
                _TIME_SEEN[row] = True
            rows[k] = row
    at = np.array(rows, dtype=np.intp)  # (converted once for the three takes)
    harm = _TIME_TABLE.take(at, axis=0)  # take: no fancy-index path
    sq = harm * harm
    hours, whole = _ROW_HOURS.take(at), _ROW_WHOLE.take(at)
    for arr in (harm, sq, hours, whole):
        arr.flags.writeable = False
    return harm, sq, hours, whole


def _activity(stats: CustomerStats, now_ms: int) -> tuple[float, float, float, float, float]:
    """The customer vector's recency and fatigue entries: sends in the last 1, 7 and 30 days (log1p),
    the last click's recency (or a never-clicked flag). Forgets sends older than 30 days."""
    sends = stats.sends
    while sends and sends[0] < now_ms - 30 * DAY_MS:
        sends.popleft()
    d1 = sum(1 for s in sends if s >= now_ms - DAY_MS)
    d7 = sum(1 for s in sends if s >= now_ms - 7 * DAY_MS)
    if stats.last_click_ms is not None:
        clicked, never = math.exp(-max(0, now_ms - stats.last_click_ms) / (7 * DAY_MS)), 0.0
    else:
        clicked, never = 0.0, 1.0
    return math.log1p(d1), math.log1p(d7), math.log1p(len(sends)), clicked, never


@lru_cache(maxsize=1024)
def _time_code(hour: float, weekend: bool) -> tuple[float, ...]:
    """The local hour of the week as features: a one-hot hour of day, a smooth daily cycle, weekend."""
    a = TWO_PI * hour / 24
    onehot = [0.0] * 24
    onehot[int(hour) % 24] = 1.0
    return (*onehot, math.cos(a), math.sin(a), 1.0 if weekend else 0.0)


def _erfcinv(y: float) -> float:
    return float(erfcinv(y))


def _ndtri(p: float) -> float:
    return float(ndtri(p))


_ZERO24 = np.zeros(24)
#: The LearnerConfig fields :meth:`DecisionLearner._best_shared` handles (whatever their values).
_BEST_FIELDS = frozenset(
    {
        "click_value",
        "unsubscribe_cost",
        "horizon_ms",
        "engagement_prior",
        "unsubscribe_prior",
        "beta",
        "engagement_events",
        "quality_window",
        "min_explore",
        "explore_unsubscribe",
        "hazard_strength",
        "hazard_load_slope",
        "explore_volume",
        "customer_channel_var",
        "crossed_prior_var",
        "hour_model",
        "hour_width",
        "hour_floor",
        "hour_offset_scale",
        "hour_prior_power",
        "hour_pop_strength",
        "hour_miss_weight",
        "hour_open_weight",
        "hour_pop_draw",
        "hour_draw_scale",
        "hour_explore",
        "probit_hours",
        "hour_onehot",
        "hour_pool",
        "hour_pool_share",
        "time_draw",
        "hazard_fit",
        "volume_optimism",
        "label_delay_ms",
        "customer_model",
        "customer_gamma_shape",
        "ignored_traits",
    }
)


def _campaign_best_of(
    group_best: np.ndarray, n_camps: int, camp_starts: np.ndarray | None, camp_of: np.ndarray
) -> np.ndarray:
    """Per group, the best mean value of any group of its campaign (its own when one group per campaign).

    >>> _campaign_best_of(np.array([0.1, 0.3, 0.2]), 2, np.array([0, 2]), np.array([0, 0, 1])).tolist()
    [0.3, 0.3, 0.2]
    """
    if n_camps == len(group_best):  # one group per campaign: its best is the campaign's
        return group_best
    if camp_starts is not None:  # each campaign's groups in a row (decide's order)
        return np.maximum.reduceat(group_best, camp_starts)[camp_of]
    camp_best = np.full(n_camps, -np.inf)
    np.maximum.at(camp_best, camp_of, group_best)
    return camp_best[camp_of]


@lru_cache(maxsize=64)
def _plain_config(cfg: LearnerConfig) -> bool:
    """Whether every field of ``cfg`` that :meth:`DecisionLearner._best_shared` does not know is at its default.

    A field added later may change how options are valued; until the shortcut is checked
    against it, a configuration that sets it is scored the full way.

    >>> _plain_config(LearnerConfig()), _plain_config(LearnerConfig(click_value=2.0))
    (True, True)
    """
    default = LearnerConfig()
    return all(
        getattr(cfg, f.name) == getattr(default, f.name) for f in fields(cfg) if f.name not in _BEST_FIELDS
    )


_NO_TEMPLATE = TemplateSpec("")
_NOTHING = np.empty(0)  # an unused array argument of the compiled valuation
_NO_ROWS = np.empty((2, 0))  # the compiled score parts' hour rows without the hour preference
_NO_EFFECT = np.empty((0, 0))  # the compiled score parts' customer effect while it is the prior
#: The weight vector's channel, time and personal offsets and customer and trait block sizes.
_LAYOUT_ARRAY = np.array(
    [(lay := FeatureLayout()).channel, lay.time, lay.personal, lay.n_customer, lay.n_traits1], dtype=np.int64
)


@lru_cache(maxsize=64)
def _parts_config(cfg: LearnerConfig) -> bool:
    """Whether :func:`cadence.engine.valuation.score_parts` computes the score parts for ``cfg``.

    It does for the probit's hour x trait block at its posterior mean (not pooled, not drawn),
    the hour preference's expected lift (not a drawn hour) or none, and the probit customer
    model; and, as :func:`_plain_config`, for no field added since it was checked.

    >>> _parts_config(LearnerConfig()), _parts_config(LearnerConfig(time_draw=True))
    (True, False)
    """
    return (
        cfg.probit_hours
        and not cfg.hour_pool
        and not cfg.time_draw
        and not cfg.hour_explore
        and cfg.customer_model == "probit"
        and _plain_config(cfg)
    )


_NO_CH = ChannelPolicy(())
