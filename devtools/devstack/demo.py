"""`demo`: submit a job through `ConveyorClient`, stream its tokens, print the outcome."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from conveyor.core.config import Settings

from .dev_tenant import DEV_KEY_FILE

DEMO_PROMPT = "Write a haiku about durable queues."
DEMO_MODEL = "claude-sonnet-4-5"
DEMO_MAX_TOKENS = 128
DEMO_TIMEOUT_S = 120.0


async def _demo(settings: Settings) -> int:
    from conveyor.cli import describe_job, stream_job
    from conveyor.client import ConveyorClient, ConveyorError, job_status_name
    from conveyor.v1 import jobs_pb2

    began = time.monotonic()
    key_file = settings.run_dir / DEV_KEY_FILE
    api_key = os.environ.get("CONVEYOR_API_KEY") or (
        key_file.read_text().strip() if key_file.exists() else None
    )
    try:
        async with ConveyorClient(
            settings.gateway_target, settings.notifier_target, api_key=api_key
        ) as client:
            job = await client.submit(
                DEMO_MODEL,
                DEMO_PROMPT,
                max_tokens=DEMO_MAX_TOKENS,
                labels={"source": "devstack-demo"},
            )
            print(f"submitted job {job.id} ({DEMO_MODEL}): {DEMO_PROMPT}", flush=True)
            print(flush=True)
            async with asyncio.timeout(DEMO_TIMEOUT_S):
                final = await stream_job(client, job.id, sys.stdout, None, final_line=False)
    except ConveyorError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        print("hint: is the stack up? (make up)", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"error: the job did not finish within {DEMO_TIMEOUT_S:.0f} s", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - began
    usage = final.usage
    print()
    print(f"status:  {job_status_name(final.status)}  (attempts {final.attempts})")
    print(
        f"usage:   {usage.input_tokens} input + {usage.output_tokens} output tokens"
        f"  stop_reason={final.stop_reason or '-'}"
    )
    print(f"elapsed: {elapsed:.2f} s from submit to finish")
    if final.status != jobs_pb2.JOB_STATUS_SUCCEEDED:
        print(f"error: the demo job did not succeed: {describe_job(final)}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(settings: Settings) -> int:
    return asyncio.run(_demo(settings))
