"""The Dialer: starts outbound calls and works through this instance's share of every batch.

How a batch survives an instance restart (claims, status callbacks, STALE_CLAIM_S) is
described in the package docstring, gateway/outbound/__init__.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import structlog

from gateway.carriers.twilio.rest import FINAL_CALL_STATUSES, TwilioRestError
from gateway.control.parse import error
from gateway.outbound.parse import BatchSpec, progress
from gateway.outbound.store import OutboundStore
from gateway.registry.base import CallRecord, SessionRegistry, digest, new_secret

log = structlog.get_logger(__name__)

# A claim with no callback after this long, whose owner is gone, was never dialled. Twilio
# posts `initiated` within a second of creating a call; 15 s leaves room for a slow network.
STALE_CLAIM_S = 15.0
# An outbound call's record waits this long for its answer: ringing, machine detection
# (DetectMessageEnd waits for the greeting to end) and Twilio's own queueing.
DIALING_TTL_S = 600
# A recipient Twilio turned away for being busy (20429, 429, 503) is tried again after this.
BUSY_RETRY_S = 2.0
# On shutdown, in-flight call creations get this long to finish (each is bounded by the REST
# client's own timeout); they are never cancelled halfway, which could ring someone twice.
CLOSE_WAIT_S = 15.0
# POST /calls waits at most this long for its turn under CALLS_PER_SECOND, then answers 429.
MAX_START_WAIT_S = 10.0
# Calls being created at once by one instance's batch worker.
MAX_PARALLEL_CREATES = 8
WORKER_IDLE_S = 0.2


CreateCall = Callable[..., Awaitable[str]]  # TwilioCalls.create_call
FindCall = Callable[..., Awaitable[str | None]]  # TwilioCalls.find_call


class CallOutcomeUnknown(Exception):
    """Twilio did not answer a call's creation: the call may exist. `attempt` says what to look
    for ({"slot", "to", "from", "at"}); the slot stays held until it is settled."""

    def __init__(self, attempt: dict[str, Any]) -> None:
        super().__init__("Twilio did not answer the call's creation; it may exist")
        self.attempt = attempt


UrlBuilder = Callable[[str, str], str]


class Dialer:
    """Starts outbound calls and runs this instance's share of every batch."""

    def __init__(
        self,
        store: OutboundStore,
        registry: SessionRegistry,
        create_call: CreateCall,
        url: UrlBuilder,
        *,
        calls_per_second: float,
        max_concurrent: int,
        find_call: FindCall | None = None,
    ) -> None:
        self.store = store
        self._registry = registry
        self._create_call = create_call
        self._find_call = find_call
        self._url = url
        self._rate = calls_per_second
        self._cap = max_concurrent
        self._worker: asyncio.Task[None] | None = None
        self._creates = asyncio.Semaphore(MAX_PARALLEL_CREATES)
        self._jobs: set[asyncio.Task[None]] = set()
        self._specs: dict[str, BatchSpec] = {}  # the batches this instance is dialling
        self._in_hand: set[tuple[str, int]] = set()  # (batch, recipient) claims being dialled here

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run_batches(), name="batch-worker")

    def stop_claiming(self) -> None:
        """Draining: this instance takes no more recipients (others carry the batch on)."""
        if self._worker is not None:
            self._worker.cancel()

    async def close(self) -> None:
        self.stop_claiming()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._jobs:
            # Not cancelled: a create cut off after Twilio accepted it would leave a claim
            # that looks undialled, and the recipient would be rung again.
            await asyncio.wait(set(self._jobs), timeout=CLOSE_WAIT_S)
        await self.store.close()

    async def start_call(self, args: dict[str, Any]) -> str:
        """One call for `POST /calls` (`args` from parse_call): a slot, its turn, then the call.
        Refused with 429 when every slot is taken or the turn is too far off, 502 when Twilio
        refuses it."""
        slot = "c" + secrets.token_hex(8)
        if not await self.store.acquire_slot(slot, self._cap):
            raise error(429, "too_many_calls", "MAX_CONCURRENT_CALLS outbound calls are live")
        try:
            wait = await self.store.reserve_start(self._rate)
            if wait > MAX_START_WAIT_S:
                raise error(429, "rate_limited", f"CALLS_PER_SECOND reached; retry in {wait:.0f} s")
            await asyncio.sleep(wait)
        except BaseException:
            await self.store.release_slot(slot)
            raise
        attempted_at = time.time()
        try:
            return await self.dial(**args, slot=slot)  # frees the slot if it surely failed
        except TwilioRestError as exc:
            if exc.ambiguous:
                attempt = {"slot": slot, "to": args["to"], "from": args["from_"], "at": attempted_at}
                raise CallOutcomeUnknown(attempt) from None
            raise error(502, "twilio_refused", str(exc)) from None

    async def settle(self, to: str, from_: str, since: float) -> str | None:
        """The SID of the call an unanswered create made, if Twilio has one (a REST lookup)."""
        if self._find_call is None:
            return None
        return await self._find_call(to=to, from_=from_, created_after=since)

    async def start_batch(self, spec: BatchSpec) -> None:
        """A batch for `POST /calls/batch`: stored, and dialled by every instance's worker."""
        await self.store.create_batch(spec)
        log.info("batch_created", batch_id=spec.batch_id, total=len(spec.recipients))

    async def dial(
        self,
        *,
        to: str,
        from_: str,
        agent: str,
        metadata: dict[str, Any],
        machine_detection: str = "",
        slot: str,
        status_query: dict[str, str] | None = None,
    ) -> str:
        """Create the Twilio call and register it so its answer reaches `agent` with `metadata`.

        The caller holds `slot` and has waited for its start; on failure the slot is freed here.
        """
        query = urlencode({"slot": slot, **(status_query or {})})
        fields: dict[str, Any] = {
            "to": to,
            "from_": from_,
            "url": self._url("/twilio/voice", urlencode({"agent": agent})),
            "method": "POST",
            "status_callback": self._url("/twilio/status", query),
            "status_callback_event": ["initiated", "ringing", "answered", "completed"],
            "status_callback_method": "POST",
        }
        if machine_detection:
            fields["machine_detection"] = machine_detection
        try:
            call_sid = await self._create_call(**fields)
        except TwilioRestError as exc:
            if exc.ambiguous:  # the call may exist: its slot is freed only once that is settled
                log.warning("outbound_create_unanswered", to_suffix=to[-4:], error=str(exc))
            else:
                await self.store.release_slot(slot)
            raise
        except Exception:
            await self.store.release_slot(slot)
            raise
        record = CallRecord(
            call_sid=call_sid,
            owner=self._registry.instance_id,
            state="dialing",
            from_=from_,
            to=to,
            agent_id=agent,
            direction="outbound-api",
            token_hash=digest(new_secret()),  # the real token is minted when the call answers
            metadata=metadata,
        )
        try:
            await self._registry.put(record, DIALING_TTL_S)
        except Exception as exc:
            log.warning("outbound_record_not_saved", call_sid=call_sid, error=str(exc))
        log.info("outbound_call_started", call_sid=call_sid, agent_id=agent)
        return call_sid

    async def call_status(self, call_sid: str, status: str, query: dict[str, str]) -> None:
        """A status callback for a call we started: progress the batch, free the slot when over."""
        batch_id, index = query.get("batch", ""), query.get("r", "")
        if batch_id and index.isdigit():
            if status in FINAL_CALL_STATUSES:
                await self.store.update(
                    batch_id,
                    int(index),
                    {"status": "done", "outcome": status, "call_sid": call_sid},
                    only_from=("claimed", "dialled"),
                )
            else:
                await self.store.update(
                    batch_id, int(index), {"status": "dialled", "call_sid": call_sid}, only_from=("claimed",)
                )
        if status in FINAL_CALL_STATUSES and query.get("slot"):
            await self.store.release_slot(query["slot"])

    # Batches

    async def _run_batches(self) -> None:
        backoff = WORKER_IDLE_S
        last_sweep = 0.0
        while True:
            try:
                busy = False
                for batch_id in await self.store.active_batches():
                    if time.monotonic() - last_sweep > 2.0:
                        await self._sweep(batch_id)
                    busy |= await self._dial_next(batch_id)
                if time.monotonic() - last_sweep > 2.0:
                    last_sweep = time.monotonic()
                backoff = WORKER_IDLE_S
                if not busy:
                    await asyncio.sleep(WORKER_IDLE_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is unreachable: try again, slower
                log.warning("batch_worker_error", error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _dial_next(self, batch_id: str) -> bool:
        slot = "b" + secrets.token_hex(8)  # URL-safe as is: it travels in a signed URL
        if not await self.store.acquire_slot(slot, self._cap):
            return False
        try:
            index = await self.store.claim(batch_id, self._registry.instance_id, slot)
        except BaseException:
            await self.store.release_slot(slot)
            raise
        if index is None:
            await self.store.release_slot(slot)
            return False
        # Until its dial is over, the claim is in hand here; one left behind by a failure (the
        # store unreachable between the claim and the dial) is requeued by our own sweep.
        claimed = (batch_id, index)
        self._in_hand.add(claimed)
        try:
            # Paced only once there is someone to call: an idle batch must not use up the rate.
            wait = await self.store.reserve_start(self._rate)
            if wait > 0:
                await asyncio.sleep(wait)
            spec = await self._spec(batch_id)
            if spec is None:  # the batch expired under us: nobody to call
                self._in_hand.discard(claimed)
                await self.store.release_slot(slot)
                return False
            await self._creates.acquire()
        except BaseException:
            self._in_hand.discard(claimed)
            raise
        job = asyncio.create_task(self._dial_recipient(spec, index, slot))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        job.add_done_callback(lambda _job: self._in_hand.discard(claimed))
        return True

    async def _dial_recipient(self, spec: BatchSpec, index: int, slot: str) -> None:
        recipient = spec.recipients[index]
        try:
            call_sid = await self.dial(
                to=recipient.to,
                from_=spec.from_,
                agent=spec.agent,
                metadata={**spec.metadata, **recipient.metadata, "batch_id": spec.batch_id},
                machine_detection=spec.machine_detection,
                slot=slot,
                status_query={"batch": spec.batch_id, "r": str(index)},
            )
        except TwilioRestError as exc:
            if exc.ambiguous:  # still claimed: its callback, or the sweep's lookup, settles it
                await self.store.update(
                    spec.batch_id, index, {"unanswered_at": time.time()}, only_from=("claimed",)
                )
            elif exc.nothing_created:  # Twilio was too busy: nobody was called, try again later
                log.warning("batch_call_deferred", batch_id=spec.batch_id, index=index, error=str(exc))
                await asyncio.sleep(BUSY_RETRY_S)
                await self.store.requeue(spec.batch_id, index)
            else:
                log.warning("batch_call_failed", batch_id=spec.batch_id, index=index, error=str(exc))
                await self.store.update(
                    spec.batch_id, index, {"status": "failed", "error": str(exc)}, only_from=("claimed",)
                )
        else:
            await self.store.update(
                spec.batch_id, index, {"status": "dialled", "call_sid": call_sid}, only_from=("claimed",)
            )
        finally:
            self._creates.release()

    async def _settle_recipient(self, spec: BatchSpec, index: int, state: dict[str, Any]) -> None:
        """A claim whose dial never reported back (Twilio did not answer the create, or the
        store could not be told), and no callback since: did Twilio make the call?"""
        to = spec.recipients[index].to
        call_sid = await self.settle(to, spec.from_, state.get("at") or state.get("unanswered_at", 0.0))
        if call_sid is not None:
            log.info("batch_create_settled", batch_id=spec.batch_id, index=index, call_sid=call_sid)
            state = {"status": "dialled", "call_sid": call_sid}
            await self.store.update(spec.batch_id, index, state, only_from=("claimed",))
        else:  # nobody was called: dial them again
            log.info("batch_create_settled", batch_id=spec.batch_id, index=index, call_sid=None)
            await self.store.release_slot(state.get("slot", ""))
            await self.store.requeue(spec.batch_id, index)

    async def _spec(self, batch_id: str) -> BatchSpec | None:
        """The batch's spec, read once per instance: it never changes, and a dial must not read
        the whole batch from the store (a 1,000-recipient batch is ~50 KiB)."""
        spec = self._specs.get(batch_id)
        if spec is None:
            spec = await self.store.spec(batch_id)
            if spec is not None:
                self._specs[batch_id] = spec
        return spec

    async def _sweep(self, batch_id: str) -> None:
        """Requeue claims of dead instances that never dialled; close finished batches. Reads
        only the stale claims and the count of finished recipients, not the whole batch."""
        spec = await self._spec(batch_id)
        if spec is None:
            await self.store.finish_batch(batch_id)
            return
        stale = await self.store.stale_claims(batch_id, time.time() - STALE_CLAIM_S)
        for index, state in stale.items():
            if state.get("status") != "claimed":
                continue
            owner = state.get("owner", "")
            if (batch_id, index) in self._in_hand:
                continue  # being dialled here right now
            # Ours but no longer in hand (its dial failed half-way, the store unreachable), or
            # unanswered by Twilio with its owner gone: was a call made? Twilio's list says.
            ours = owner == self._registry.instance_id
            if time.time() - state.get("unanswered_at", 0.0) < STALE_CLAIM_S:
                continue  # Twilio's answer was lost only just now: give its callback time
            if ours or ("unanswered_at" in state and not await self._registry.owner_alive(owner)):
                await self._settle_recipient(spec, index, state)
            elif not await self._registry.owner_alive(owner):
                log.warning("batch_claim_requeued", batch_id=batch_id, index=index)
                await self.store.release_slot(state.get("slot", ""))
                await self.store.requeue(batch_id, index)
        if await self.store.finished(batch_id) >= len(spec.recipients):
            found = await self.store.batch(batch_id)  # once, for the closing log line
            await self.store.finish_batch(batch_id)
            self._specs.pop(batch_id, None)
            if found is not None:
                log.info("batch_finished", batch_id=batch_id, **progress(*found))
