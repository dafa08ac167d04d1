"""Whether to draft at all: the gates the hardware-aware policies (dspark.scheduler.SPSPolicy) consult before
asking the drafter. `DraftGate` decides per request from its drafts' confidences; `ThroughputGate` decides per
round and drafting source from measured throughput. Both read earlier rounds only (lossless)."""

from __future__ import annotations

import math
import statistics

from dspark.drafters.base import DEFAULT_SOURCE


class DraftGate:
    """Whether a request drafts at all this round. Drafting costs time even when the scheduler then
    verifies nothing, so a request whose last first-draft survival a_1 would not pay for one verified
    token at the current batch size skips drafting, probing again after `probe_every` rounds; each
    probe of a request that still does not pay doubles its wait (up to `max_wait`). A request with no
    a_1 of its own yet takes `prior`, a running mean over earlier requests of the first a_1 each showed,
    so a batch of new requests does not pay a drafting round that earlier ones showed to be wasted (the
    price: a new request which would pay, arriving after ones that did not, first drafts at its first
    probe). At most `max_probes` requests probe in one round (those idle longest; the rest wait a
    round), so a large batch that started together does not pay for a drafting round all at once.
    Lossless: the decision reads only earlier rounds."""

    def __init__(self, sps, probe_every: int = 8, max_wait: int = 64, prior_smoothing: float = 0.1,
                 max_probes: int = 2):
        self.sps, self.probe_every, self.max_wait, self.prior_smoothing = sps, probe_every, max_wait, prior_smoothing
        self.max_probes = max_probes
        self.first: dict[int, float] = {}  # request id -> a_1 of its last proposal
        self.idle: dict[int, int] = {}     # request id -> rounds since it last drafted
        self.wait: dict[int, int] = {}     # request id -> rounds between its probes
        self.prior: float | None = None    # running mean over requests of their first a_1

    def should_draft(self, requests: list, eligible: list[bool] | None = None) -> list[bool]:
        """eligible: per request, whether the policy's other gate lets it draft at all (default: all). The
        others get False and only count as idle; the batch is priced and pruned whole, so their state stays."""
        r = len(requests)
        eligible = eligible if eligible is not None else [True] * r
        ids = {q.id for q in requests}
        for table in (self.first, self.idle, self.wait):
            for key in [k for k in table if k not in ids]:
                del table[key]
        pays_at = r * self.sps(r) / self.sps(r + 1) - r  # the a_1 above which one verified token pays
        decisions, due = [], []  # due: (request, whether an a_1 is known for it) owed a probe
        for i, q in enumerate(requests):
            if not eligible[i]:
                decisions.append(False)
                continue
            a = self.first.get(q.id, self.prior)
            paying = a is not None and a > pays_at
            if paying:
                self.wait[q.id] = self.probe_every
            elif a is None or self.idle.get(q.id, 0) + 1 >= self.wait.get(q.id, self.probe_every):
                due.append((i, a is not None))  # nothing known, or its wait is over
            decisions.append(paying)
        due.sort(key=lambda d: -self.idle.get(requests[d[0]].id, 0))  # stable: ties keep the batch order
        for i, known in due[: self.max_probes]:
            decisions[i] = True
            if known:  # a probe of a request believed not to pay: the next one waits twice as long
                q = requests[i]
                self.wait[q.id] = min(2 * self.wait.get(q.id, self.probe_every), self.max_wait)
        for q, draft in zip(requests, decisions):
            self.idle[q.id] = 0 if draft else self.idle.get(q.id, 0) + 1
        return decisions

    def observe(self, requests: list, survivals: list[list[float]]) -> None:
        for q, a in zip(requests, survivals):
            if a:
                if q.id not in self.first:  # one term per request, however often it drafts
                    self.prior = a[0] if self.prior is None else self.prior + self.prior_smoothing * (a[0] - self.prior)
                self.first[q.id] = a[0]


class ThroughputGate:
    """Whether a round drafts at all, from measured throughput: the SPS curve prices verification but not the drafter,
    whose cost can exceed what its accepted tokens save (a weak drafter on a fast target). Keeps, per batch size
    (bucketed) and drafting source (a drafter that combines several, such as n-gram lookup and a learned drafter,
    reports which one would speak: their costs and yields differ), the throughput of the rounds it drafted (a
    decaying ratio of sums) and of plain rounds (a moving average), and takes the faster. Drafting must be faster by
    `margin`: a drafting round that verifies nothing costs a little more than a plain one, and round-to-round noise
    would otherwise hand it the tie.

    It tries the other arm after `explore_every` rounds so that both estimates stay fresh; each time the tried arm
    loses again the wait doubles (up to `max_wait`), so a drafter that never pays costs less and less. Up to
    `max_wait`, the wait is never shorter than what keeps exploring within `explore_cost` of the time: a trial round
    costs its tokens' time at its arm's rate less their time at the other's, counted in the other arm's rounds (a
    drafting round measured at a third of plain decoding's rate, emitting as many tokens, costs two plain rounds:
    with 0.5%, it is tried again after 400 rounds at the soonest). On the 2-vCPU CPU, where neither of `auto`'s sources
    pays from 2 requests on, trials at 2% cost the load bench 1-2% of its decoding throughput at 2-8
    requests. A round's time includes the drafter's work deferred from rounds it did not draft in: a drafter that
    must catch up before it drafts again is priced with that.

    Plain decoding's estimates start as the median of its first rounds (a moving average from 1 / smoothing rounds
    on), and drafting is chosen over plain decoding only once plain decoding has `plain_samples` rounds measured in
    the bucket: a single cold plain round measured slow would otherwise hand a losing drafter a long run of rounds.
    A drafting source's rate is its tokens over its time, both summed over its rounds with weights decaying by (1 -
    draft_smoothing) a round: a drafting round emits one token or several by chance, and a median or moving average
    of per-round rates swings with a few lucky or unlucky rounds (n-gram lookup on code emits 1 to 3 tokens a round
    at ~1.5x a plain round's time, ~1.4x plain's rate on average, yet a run of rejected drafts pulled a 4-round
    average below plain often enough, each loss doubling the wait, to keep `--drafter auto` at plain speed; a median
    of four lucky rounds kept sources a few % slower than plain drafting at 2-4 requests). A source's first
    `warm_rounds` drafting rounds are not measured at all (it is tried again at once): it pays one-time costs
    (n-gram lookup's first round ran at half plain decoding's rate, and alone in a ratio of sums over a few rounds
    it could keep the source off). Since any one round's yield is chance, a drafting source is not backed off on
    fewer than `draft_samples` rounds: until it has them its wait does not double (its trials still within
    explore_cost of the time, so a learned drafter whose trial at 16 requests commits every context first is tried
    rarely from its first round on). The default margin (5%) covers what the gate cannot see: plain rounds beside
    drafting ones run a little slower than in an engine that never drafts (on chat prompts, where n-gram and corpus
    drafts pay only ~1.0x, a 2% margin let them draft and left `auto` at 0.97-0.98x of plain decoding).

    `expected(batch)`: the tokens/s plain decoding should reach at that batch size (SPSPolicy passes
    batch * SPS(batch)), a function of the batch size alone (read once per size). Rates are kept as
    measured over expected, so that rounds of different sizes in one bucket, and buckets near each
    other, compare fairly; without it, tokens/s per request. An arm not yet
    measured in a bucket takes the nearest bucket's estimate, and a source's exploration wait too: as a
    batch grows or shrinks through the buckets, a drafter that lost in the last one is not tried again
    at once. Only an arm measured in no bucket at all is tried first (drafting before plain).
    Lossless: the decision reads only earlier rounds' counts and times and the committed context
    (through the source)."""

    PLAIN = "plain"

    @staticmethod
    def bucket(batch: int) -> int:
        """Batch sizes share estimates within powers of two (1, 2, 3-4, 5-8, ...)."""
        return 1 << max(batch - 1, 0).bit_length()

    def __init__(self, explore_every: int = 16, smoothing: float = 0.25, max_wait: int = 1024,
                 explore_cost: float = 0.005, margin: float = 0.05, expected=None, plain_samples: int = 3,
                 draft_samples: int = 4, draft_smoothing: float = 0.05, warm_rounds: int = 1):
        for name, value in (("smoothing", smoothing), ("draft_smoothing", draft_smoothing)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {value}")
        if not explore_cost > 0:
            raise ValueError(f"explore_cost must be > 0, got {explore_cost}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.explore_every, self.smoothing, self.max_wait = explore_every, smoothing, max_wait
        self.draft_smoothing = draft_smoothing
        if draft_samples < 1:
            raise ValueError(f"draft_samples must be >= 1, got {draft_samples}")
        if warm_rounds < 0:
            raise ValueError(f"warm_rounds must be >= 0, got {warm_rounds}")
        self.explore_cost, self.margin, self.plain_samples = explore_cost, margin, plain_samples
        self.draft_samples, self.warm_rounds = draft_samples, warm_rounds
        self.expected = expected if expected is not None else float
        self.rates: dict[tuple[int, str], float] = {}  # (bucket, source or PLAIN) -> (relative) throughput
        self.yields: dict[tuple[int, str], float] = {}  # the same keys -> tokens per request per round
        self.samples: dict[tuple[int, str], int] = {}  # the same keys -> rounds measured
        self._first: dict[tuple[int, str], tuple[list, list]] = {}  # plain keys -> their first rounds' values
        self._sums: dict[tuple[int, str], list[float]] = {}  # drafting keys -> decaying sums (_update_drafting)
        self.warmed: dict[str, int] = {}  # source -> its drafting rounds left unmeasured (up to warm_rounds)
        self._median_rounds = max(1, round(1 / smoothing))
        self.since_other: dict[tuple[int, str], int] = {}
        self.wait: dict[tuple[int, str], int] = {}  # rounds between explorations
        self.waited: dict[tuple[int, str], int] = {}  # the wait the last exploration came after
        self.exploring: dict[tuple[int, str], bool] = {}  # keys whose last decision tried the slower arm (True)
        self.quiet_left: dict[int, tuple[int, list]] = {}  # bucket -> (rounds its quiet stretch still lasts, keys)
        self._expected: dict[int, float] = {}  # batch -> expected(batch), a function of the batch alone

    def _nearest(self, table: dict, bucket: int, arm: str):
        """table's value for (bucket, arm), else for the nearest bucket holding one (the smaller on ties)."""
        if (bucket, arm) in table:
            return table[(bucket, arm)]
        held = [b for b, a in table if a == arm]
        if not held:
            return None
        near = min(held, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), b))
        return table[(near, arm)]

    def _arms(self, bucket: int, source: str) -> tuple[float | None, float | None]:
        return self._nearest(self.rates, bucket, source), self._nearest(self.rates, bucket, self.PLAIN)

    def _best(self, bucket: int, source: str) -> bool | None:
        draft_rate, plain_rate = self._arms(bucket, source)
        if draft_rate is None or plain_rate is None:
            return None
        return draft_rate > plain_rate * (1.0 + self.margin)

    def _least_wait(self, bucket: int, source: str) -> int:
        """Rounds between explorations that keep their cost within explore_cost of the time. A round of the slower arm
        emits y_slow tokens per request where the faster arm's rounds emit y_fast; its cost is the time
        those tokens take at the slower rate less their time at the faster one, which is
        (y_slow / y_fast) * (faster rate / slower rate - 1) rounds of the faster arm."""
        draft_rate, plain_rate = self._arms(bucket, source)
        draft_yield = self._nearest(self.yields, bucket, source) or 1.0
        plain_yield = self._nearest(self.yields, bucket, self.PLAIN) or 1.0
        if draft_rate > plain_rate:
            cost = (plain_yield / draft_yield) * (draft_rate / plain_rate - 1.0)
        else:
            cost = (draft_yield / plain_yield) * (plain_rate / draft_rate - 1.0)
        return math.ceil(cost / self.explore_cost)

    def _unsettled(self, key: tuple[int, str]) -> bool:
        """Whether key's source has fewer than draft_samples rounds measured (in its bucket, else the nearest)."""
        return (self._nearest(self.samples, *key) or 0) < self.draft_samples

    def _served(self, key: tuple[int, str]) -> tuple[int, int]:
        """(rounds of its bucket before key's next exploration, the wait stored for it)."""
        if self._unsettled(key):  # no doubling yet
            wait = self.explore_every
        else:
            wait = self.wait.get(key) or self._nearest(self.wait, *key) or self.explore_every
        return min(max(wait, self._least_wait(*key)), self.max_wait), wait

    def quiet(self, batch: int) -> bool:
        """Whether no source known so far would draft in a round of this batch size: each prefers plain
        decoding in its bucket and its next exploration is not due. Such a round is counted towards every
        known source's exploration (as though each would have spoken in it), so that the caller need not
        ask which source speaks; a round that is not quiet is left to should_draft. A source never seen
        yet is found at the next round that is not quiet (at most max_wait rounds on). A quiet stretch is
        judged once, at its start, and lasts until the first source is due: plain rounds within it update
        the plain rate without ending it (a drafted round or a settled trial does), so that a quiet round
        costs a few dictionary updates (the gate runs between rounds, its Python at cold caches)."""
        bucket = self.bucket(batch)
        left, keys = self.quiet_left.get(bucket, (0, None))
        if left <= 0:
            keys = [(bucket, arm) for arm in dict.fromkeys(arm for _, arm in self.rates) if arm != self.PLAIN]
            if not keys or any(self._best(*key) is not False for key in keys):
                return False
            if any(self._nearest(self.rates, bucket, source) is None for source in self.warmed):
                return False  # a source whose unmeasured first round ran is owed a measured one
            left = min(self._served(key)[0] - self.since_other.get(key, 0) - 1 for key in keys)
            if left <= 0:
                return False
        self.quiet_left[bucket] = (left - 1, keys)
        for key in keys:
            self.since_other[key] = self.since_other.get(key, 0) + 1
        return True

    def should_draft(self, batch: int, source: str = DEFAULT_SOURCE) -> bool:
        bucket = self.bucket(batch)
        key = (bucket, source)
        best = self._best(bucket, source)
        if best is None:  # an arm measured nowhere yet: drafting first, then plain
            return self._nearest(self.rates, bucket, source) is None
        if best and self.samples.get((bucket, self.PLAIN), 0) < self.plain_samples:
            return False  # drafting wins only against a plain rate of a few rounds of this bucket, not one
        rounds = self.since_other.get(key, 0) + 1
        served, wait = self._served(key)
        exploring = rounds >= served
        self.wait[key] = wait
        self.since_other[key] = 0 if exploring else rounds
        if exploring:
            self.exploring[key] = True
            self.waited[key] = served
        else:
            self.exploring.pop(key, None)
        return best != exploring

    def observe(self, batch: int, drafted: bool, tokens: int, seconds: float, sources: tuple[str, ...] = ()) -> None:
        """A round of `batch` requests: whether it drafted, and the sources that did (default: one)."""
        if seconds <= 0 or tokens <= 0:
            return
        expected = self._expected.get(batch)
        if expected is None:
            expected = self._expected[batch] = self.expected(batch)
        rate, per_request = tokens / seconds / expected, tokens / batch
        bucket = self.bucket(batch)
        if not drafted:
            # Settles the sources whose decision this round was to explore plain decoding. A source that was
            # to explore drafting but did not draft (another gate vetoed every request) was not measured:
            # its trial is dropped, its wait unchanged.
            pending = []  # exploring plain means drafting was the better arm before this round
            for key in [k for k in self.exploring if k[0] == bucket]:
                if self._best(*key):
                    pending.append(key)
                else:
                    del self.exploring[key]
            self._update((bucket, self.PLAIN), rate, per_request)
            for key in pending:
                self._settle(key, True)
            return
        self.quiet_left.pop(bucket, None)  # a source's rate moved: judge the next quiet stretch afresh
        for source in sources or (DEFAULT_SOURCE,):
            if self.warmed.get(source, 0) < self.warm_rounds:  # one-time costs: not measured, tried again
                self.warmed[source] = self.warmed.get(source, 0) + 1
                continue
            key = (bucket, source)
            before = self._best(bucket, source)
            self._update_drafting(key, tokens / expected, seconds, per_request)
            plain = self._nearest(self.rates, bucket, self.PLAIN)
            self._settle(key, before, trial_paid=plain is not None and rate > plain * (1.0 + self.margin))

    def _update(self, key: tuple[int, str], rate: float, per_request: float) -> None:
        """Plain decoding's estimates: the median of the first rounds, then a moving average from there. A moving
        average from the first round would keep that round (often a cold one: the first plain round after a
        prefill) at weight (1 - smoothing)^n, mispricing the arm for many rounds."""
        n = self.samples[key] = self.samples.get(key, 0) + 1
        first = self._first.setdefault(key, ([], []))
        for table, value, seen in ((self.rates, rate, first[0]), (self.yields, per_request, first[1])):
            if n <= self._median_rounds:
                seen.append(value)
                table[key] = statistics.median(seen)
            else:
                table[key] += self.smoothing * (value - table[key])

    def _update_drafting(self, key: tuple[int, str], tokens: float, seconds: float, per_request: float) -> None:
        """A drafting source's estimates: its tokens over its time, both summed over its rounds with weights
        decaying by (1 - draft_smoothing) a round from its second round on. A drafting
        round emits 1 token or several by chance, so a median or an average of per-round rates swings with a few
        lucky or unlucky rounds (a median of four rounds said 'wins' for a source 3% slower than plain decoding
        more often than not); a ratio of sums weighs each round by its time, as throughput does."""
        self.samples[key] = self.samples.get(key, 0) + 1
        keep = 1.0 - self.draft_smoothing
        sums = self._sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])  # tokens, seconds, per-request tokens, rounds
        for i, value in enumerate((tokens, seconds, per_request, 1.0)):
            sums[i] = keep * sums[i] + value
        self.rates[key] = sums[0] / sums[1]
        self.yields[key] = sums[2] / sums[3]

    def _settle(self, key: tuple[int, str], before: bool | None, trial_paid: bool = False) -> None:
        """After a trial of the arm that was losing: the wait doubles if the estimate still prefers the other arm
        and the trial round itself did not pay either. One drafting round moves a ratio of sums over ~20 rounds
        little, so a source that lost its estimate by chance would otherwise wait ever longer for the trials that
        could restore it; a trial round that paid keeps its next trial explore_every rounds away."""
        if self.exploring.pop(key, False):
            self.quiet_left.pop(key[0], None)
            lost = self._best(*key) == before and not self._unsettled(key) and not trial_paid
            waited = self.waited.pop(key, self.wait.get(key, self.explore_every))
            self.wait[key] = min(2 * waited, self.max_wait) if lost else self.explore_every
