"""One model call of a job: wait for provider budget, then stream the answer.

The job's timeout runs from before the wait for budget (services.worker.limiter), so
a job cannot wait for budget without end. The call is traced as a GenAI client span
(semantic conventions for gen_ai.*) and its tokens are counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from opentelemetry.trace import SpanKind, StatusCode

from conveyor.core.lifecycle import Job
from conveyor.core.metrics import TOKENS
from conveyor.core.telemetry import tracer
from conveyor.llm.provider import Completion, DeltaSink, Provider, classify

from .limiter import ProviderLimiter

OnResponse = Callable[[Mapping[str, str]], Awaitable[None]]


class ModelCaller:
    """Makes a job's model call through `provider`, within `limiter`'s budget (None: no
    limits); `model_label` names a model in the metrics."""

    def __init__(
        self,
        provider: Provider,
        limiter: ProviderLimiter | None,
        model_label: Callable[[str], str],
    ) -> None:
        self.provider = provider
        self.limiter = limiter
        self.model_label = model_label

    async def __call__(
        self, job: Job, on_delta: DeltaSink, headers: Mapping[str, str]
    ) -> Completion:
        """The completion of one call of `job`, after waiting for provider budget; the
        wait counts against the job's timeout."""
        deadline = asyncio.get_running_loop().time() + job.timeout_ms / 1000
        limiter = self.limiter
        if limiter is None:
            return await self._stream(job, on_delta, headers, None, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                permit = await limiter.acquire(job.model, job.request or {})
        except TimeoutError:
            raise TimeoutError("the job's timeout ran out waiting for rate-limit budget") from None
        usage: Mapping[str, int] | None = None
        try:

            async def observe(response_headers: Mapping[str, str]) -> None:
                await limiter.observe(permit, response_headers)

            completion = await self._stream(job, on_delta, headers, observe, deadline)
            usage = completion.usage
            return completion
        except Exception as exc:
            error = classify(exc)
            if error.http_status == 429:
                await limiter.throttled(permit, error.retry_after_s, error.headers)
            raise
        finally:
            limiter.settle(permit, usage)

    async def _stream(
        self,
        job: Job,
        on_delta: DeltaSink,
        headers: Mapping[str, str],
        on_response: OnResponse | None,
        deadline: float,
    ) -> Completion:
        model, request = job.model, job.request or {}
        with tracer().start_as_current_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "anthropic",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": request.get("max_tokens", 0),
                "conveyor.attempt": job.attempts,
                "conveyor.retry_number": job.attempts - 1,
            },
        ) as span:
            try:
                async with asyncio.timeout_at(deadline):
                    completion = await self.provider.stream(
                        model, request, on_delta, headers, on_response
                    )
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    error = classify(exc)
                    span.set_attribute("error.type", error.code)
                    span.set_status(StatusCode.ERROR, error.message)
                raise
            usage = completion.usage
            span.set_attributes(
                {
                    "gen_ai.response.model": model,
                    "gen_ai.response.finish_reasons": [completion.stop_reason],
                    "gen_ai.usage.input_tokens": usage["input_tokens"],
                    "gen_ai.usage.output_tokens": usage["output_tokens"],
                }
            )
            label = self.model_label(model)  # `other` unless known or allowed
            TOKENS.labels(label, "input").inc(usage["input_tokens"])
            TOKENS.labels(label, "output").inc(usage["output_tokens"])
            return completion
