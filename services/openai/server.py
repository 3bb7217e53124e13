"""The OpenAI face's listener: started next to the router's gRPC server in
the same process and event loop, stopped with it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from aiohttp import web

from services.openai.app import OpenAIFace, OpenAISettings


@dataclass
class OpenAIListener:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stop listening at once; requests in flight get the grace period."""
        await self.runner.cleanup()


def ssl_context(settings: OpenAISettings) -> ssl.SSLContext | None:
    """HTTPS with the router's certificate; with a CA, clients (Envoy) must
    present a certificate it signed, as on the router's gRPC port."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca:
        context.load_verify_locations(settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_listener(face: OpenAIFace, settings: OpenAISettings) -> OpenAIListener:
    # handler_cancellation: a client that disconnects cancels its handler,
    # and with it the generation behind it.
    runner = web.AppRunner(
        face.app(), handler_cancellation=True, access_log=None,
        shutdown_timeout=settings.grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context(settings))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(
            f"cannot serve the OpenAI API on {settings.host}:{settings.port}: {exc}"
        ) from exc
    port = int(runner.addresses[0][1])
    return OpenAIListener(runner, port)
