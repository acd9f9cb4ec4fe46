"""Prometheus metrics of the service (prometheus_client), exposed at ``/metrics``.

Each app gets its own :class:`CollectorRegistry`, so several apps in one process
(tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; CPU serving of a small model spans tens of ms to a minute.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    """The service's counters, gauges and histograms.

    Attributes:
        requests: ``chatbot_requests_total{endpoint,status}``: finished HTTP requests by status code.
        ttft: ``chatbot_ttft_seconds``: time to first token of a chat completion.
        latency: ``chatbot_request_latency_seconds``: end-to-end latency of a chat completion.
        generated_tokens: ``chatbot_generated_tokens_total``.
        prompt_tokens: ``chatbot_prompt_tokens_total``.
        running: ``chatbot_requests_running``: generating now.
        queued: ``chatbot_requests_queued``: waiting for a generation slot.
        rejected: ``chatbot_requests_rejected_total{reason}``: 429s (``queue_full``; ``client_limit``,
            ``conversation_limit``: one client / conversation held its share of places) and timeouts.
        aborted: ``chatbot_requests_aborted_total``: client disconnected before the end.
        intents: ``chatbot_intents_total{intent}``.
        handoffs: ``chatbot_handoffs_total{reason}``.
        routing_errors: ``chatbot_routing_errors_total``: messages answered unrouted because routing failed.
        answers: ``chatbot_answers_total{kind}``: replies by how they were made (generated, verified,
            extractive, abstained, fixed; chatbot.service.ANSWER_KINDS).
        withheld: ``chatbot_withheld_sentences_total{reason}``: generated sentences no passage supports
            (the reasons of chatbot.verification.Support: unsupported_claim, claim_elsewhere, negation_mismatch,
            low_overlap, substitution, no_content, echo, repetition; and the service's truncated), never shown.
        adapter_served: ``chatbot_adapter_served{version}``: 1 for the adapter the engine serves ("" = base model).
        adapter_live: ``chatbot_adapter_live{version}``: 1 for the adapter ``LIVE.json`` names ("" = none).
        adapter_mismatch: ``chatbot_adapter_live_mismatch``: 1 while the engine serves another adapter than
            ``LIVE.json`` names (a failed or pending switch; chatbot.adapter_watch.LiveAdapterWatcher).
        adapter_errors: ``chatbot_adapter_sync_errors_total``: promoted adapters the engine could not serve.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chatbot_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("chatbot_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("chatbot_request_latency_seconds", "End-to-end chat completion latency",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("chatbot_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("chatbot_prompt_tokens", "Prompt tokens processed", registry=r)
        self.running = Gauge("chatbot_requests_running", "Requests generating now", registry=r)
        self.queued = Gauge("chatbot_requests_queued", "Requests waiting for a slot", registry=r)
        self.rejected = Counter("chatbot_requests_rejected", "Requests refused", ["reason"], registry=r)
        self.aborted = Counter("chatbot_requests_aborted", "Requests whose client went away", registry=r)
        self.intents = Counter("chatbot_intents", "Routed intents", ["intent"], registry=r)
        self.handoffs = Counter("chatbot_handoffs", "Handoffs to a human", ["reason"], registry=r)
        self.routing_errors = Counter("chatbot_routing_errors", "Messages answered unrouted: routing failed",
                                      registry=r)
        self.answers = Counter("chatbot_answers", "Replies by how they were made", ["kind"], registry=r)
        self.withheld = Counter("chatbot_withheld_sentences", "Generated sentences withheld: no passage supports them",
                                ["reason"], registry=r)
        self.adapter_served = Gauge("chatbot_adapter_served", "Adapter the engine serves (1; '' = base model)",
                                    ["version"], registry=r)
        self.adapter_live = Gauge("chatbot_adapter_live", "Adapter LIVE.json names (1; '' = none)", ["version"],
                                  registry=r)
        self.adapter_mismatch = Gauge("chatbot_adapter_live_mismatch",
                                      "1 while the engine serves another adapter than LIVE.json names", registry=r)
        self.adapter_errors = Counter("chatbot_adapter_sync_errors", "Promoted adapters the engine could not serve",
                                      registry=r)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for the ``/metrics`` endpoint."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
