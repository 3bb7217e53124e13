"""The interceptor every GenerateService call passes: it maps a MeshError
through the error table to a rich status, keeps the call's books
(services.common.call_record: metrics and one log line) and checks API keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import grpc
from llmmesh.v1 import generate_pb2 as pb

from services.common import request_context
from services.common.auth import ApiKeys
from services.common.call_record import CallRecord
from services.common.errors import MeshError, Reason
from services.common.method_interceptor import MethodInterceptor
from services.common.metrics import Metrics
from services.common.rich_status import to_status
from services.common.servicer import DEADLINE_SLACK_SECONDS, GenerationCore

if TYPE_CHECKING:
    from services.tenancy.caller import Callers

log = logging.getLogger("llmmesh.rpc")


class MeshInterceptor(MethodInterceptor):
    """Maps MeshError through the error table, records metrics, logs each RPC.

    Unexpected exceptions become INTERNAL with a generic message: the stack
    trace goes to the log, never to the client.
    """

    def __init__(
        self, core: GenerationCore, metrics: Metrics, api_keys: ApiKeys | None = None,
        callers: Callers | None = None,
    ) -> None:
        super().__init__()
        self._core = core
        self._metrics = metrics
        self._api_keys = api_keys
        # With tenants: who calls and how urgently, resolved once per call
        # into the request context (it checks the key too).
        self._callers = callers

    def _authenticate(self, rpc: _Rpc, context: grpc.aio.ServicerContext) -> None:
        if self._callers is not None:
            caller = self._callers.resolve(context.invocation_metadata())
            request_context.enter(dataclasses.replace(
                rpc.resolved, caller=caller, tenant=caller.tenant.name))
        elif self._api_keys is not None:
            self._api_keys.check(context.invocation_metadata())

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Rpc(self, method, request, context)
            try:
                self._authenticate(rpc, context)
                response = await behavior(request, context)
            except BaseException as exc:
                await rpc.fail(exc)
                raise
            else:
                rpc.finish("OK", tokens=getattr(response, "tokens", None))
                return response

        return unary

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Rpc(self, method, request, context)
            last = None
            try:
                self._authenticate(rpc, context)
                async for message in behavior(request, context):
                    if last is None and message.text:
                        rpc.first_token()
                    last = message
                    yield message
            except GeneratorExit:
                # gRPC closed the stream while it waited at a yield: the peer
                # went away, often right after the last message. The call is
                # over: nothing can be sent, nothing may be awaited, and its
                # context must not be touched (that crashed with SIGSEGV).
                if last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    self._finish_stream(rpc, last)
                else:
                    rpc.finish("CANCELLED", reason=Reason.CANCELLED)
                raise
            except BaseException as exc:
                await rpc.fail(exc)
                raise
            self._finish_stream(rpc, last)

        return stream

    @staticmethod
    def _finish_stream(rpc: _Rpc, last: Any) -> None:
        """Account a stream by its last message: an in-band error, or OK."""
        if last is not None and last.finish_reason == pb.FINISH_REASON_ERROR:
            reason = Reason(last.error.reason) if last.error.reason in Reason.__members__ else (
                Reason.INTERNAL
            )
            rpc.finish(last.error.code, reason=reason, tokens=last.tokens)
        else:
            rpc.finish("OK", tokens=last.tokens if last is not None else None)


# The metadata key that marks a call as a poll (the router's GetModel round),
# and the methods that may be one: logged at debug when they succeed.
POLL_HEADER = "x-llmmesh-poll"
POLLED = frozenset({"GetModel", "ListModels"})


class _Rpc(CallRecord):
    """The books of one RPC (services.common.call_record), and its failure as a status."""

    def __init__(
        self,
        owner: MeshInterceptor,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> None:
        resolved = owner._core.resolve(
            getattr(request, "model_id", ""), getattr(request, "scenario", "")
        )
        # The one lookup of the request's model: the core, tracing and the
        # books read it from here on.
        request_context.enter(resolved)
        self.resolved = resolved
        # Read now: once gRPC has closed the call, its context must not be used.
        peer = context.peer()
        quiet = method in POLLED and any(
            k == POLL_HEADER for k, _ in context.invocation_metadata() or ()
        )
        super().__init__(owner._metrics, method, resolved.model_label, resolved.scenario,
                         peer=lambda: peer, quiet=quiet)
        self._context = context

    async def fail(self, exc: BaseException) -> None:
        if isinstance(exc, MeshError):
            self.finish(exc.code, reason=exc.reason, message=exc.message)
            await self._context.abort_with_status(to_status(exc))
        elif isinstance(exc, asyncio.CancelledError):
            # gRPC cancels the handler both when the client goes away and when
            # the deadline passes; the time left tells them apart. Envoy resets
            # a stream a few ms before the deadline itself, hence the slack.
            remaining = self._context.time_remaining()
            if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
                self.finish("DEADLINE_EXCEEDED", reason=Reason.TIMEOUT)
            else:
                self.finish("CANCELLED", reason=Reason.CANCELLED)
        elif isinstance(exc, grpc.aio.AbortError):
            self.finish(self._context.code().name if self._context.code() else "UNKNOWN")
        else:
            log.error(
                "unhandled error", exc_info=exc, extra={"method": self._method}
            )
            error = MeshError(Reason.INTERNAL, "internal error; see the service log")
            self.finish(error.code, reason=error.reason, message=str(exc))
            await self._context.abort_with_status(to_status(error))

