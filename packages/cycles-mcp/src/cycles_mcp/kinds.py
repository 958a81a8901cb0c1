"""MCP tool name -> action kind, as the action-kinds spec (v0.1.26) says a gateway maps them.

Order: a kind the operator names (the policy's per-tool ``kind``, then its ``action_kind``: the
policy is the operator's word, a tool definition only the upstream's claim), then the spec's
normalization ("ACTION KIND NORMALIZATION FOR MCP"): the tool's ``x-cycles-action-kind`` schema
annotation, the registry's ``mcp_tool_prefixes`` (the longest matching prefix wins, so
``chat_send_x`` is ``message.chat.post``, not ``llm.completion``), then ``unknown.call``.

The annotation is a top-level key of the tool's ``inputSchema`` (the spec's "tool schema"); a
``_meta`` entry of the same name is read when the schema has none (the SDK drops unknown keys of
``annotations``, so that is no place for it). An annotated kind that is not in the registry is
handled per "UNREGISTERED KIND HANDLING": a ``custom.*`` kind must be declared (``CYCLES_CUSTOM_KINDS``
or ``cycles.ledger.custom_kinds.declare``, in the gate's process), else the call is refused; any other
unregistered kind is used as given (the core counts it ``side_effect``) and logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cycles.ledger import custom_kinds
from cycles.ledger.quotas import KIND_RISK

__all__ = [
    "ANNOTATION",
    "FALLBACK_KIND",
    "MCP_TOOL_PREFIXES",
    "annotated_kind",
    "is_undeclared_custom",
    "kind_for_tool",
]

log = logging.getLogger("cycles.mcp")

FALLBACK_KIND = "unknown.call"
ANNOTATION = "x-cycles-action-kind"

#: The registry's ``mcp_tool_prefixes`` (cycles-action-kinds-v0.1.26.yaml), kind -> prefixes.
MCP_TOOL_PREFIXES: Mapping[str, tuple[str, ...]] = {
    "llm.completion": ("llm_", "chat_", "complete_", "openai_chat", "anthropic_", "generate_text"),
    "llm.embedding": ("embed_", "embedding_", "openai_embed", "get_embedding", "encode_text"),
    "llm.structured_output": ("structured_output", "json_mode", "function_call"),
    "agent.spawn": ("spawn_agent", "create_agent", "fork_agent", "new_agent"),
    "agent.delegate": ("delegate_", "handoff_", "assign_agent", "route_to_agent"),
    "agent.message": ("send_to_agent", "agent_message", "a2a_send", "inter_agent"),
    "agent.human_escalation": ("escalate_", "human_review", "request_approval", "ask_human"),
    "web.search": ("search_", "web_search", "search"),
    "http.get": ("http_get", "fetch_url", "get_url"),
    "http.post": ("http_post", "post_url", "call_api", "api_call"),
    "http.put": ("http_put", "http_patch", "update_api"),
    "http.delete": ("http_delete", "delete_api"),
    "http.graphql": ("graphql_", "gql_query", "gql_mutate"),
    "message.email.send": ("send_email", "email_", "smtp_", "sendgrid_"),
    "message.slack.post": ("slack_", "post_slack", "send_slack"),
    "message.sms.send": ("send_sms", "sms_", "twilio_"),
    "message.chat.post": ("teams_", "discord_", "mattermost_", "chat_send", "post_message"),
    "db.query": ("db_query", "query_db", "sql_query", "select_"),
    "db.write": ("db_write", "db_insert", "db_update", "db_delete", "sql_write"),
    "db.schema_change": ("db_migrate", "alter_table", "create_table", "drop_table"),
    "crm.record.read": ("get_contact", "get_lead", "crm_read", "salesforce_get"),
    "crm.record.write": ("create_contact", "update_contact", "crm_write", "salesforce_create"),
    "crm.record.delete": ("delete_contact", "crm_delete", "salesforce_delete"),
    "file.read": ("read_file", "file_read", "get_file", "open_file"),
    "file.write": ("write_file", "file_write", "create_file", "save_file"),
    "file.delete": ("delete_file", "file_delete", "remove_file"),
    "code.exec": ("exec_", "run_code", "python_exec", "bash_exec", "js_exec"),
    "code.deploy": ("deploy_", "code_publish", "vercel_deploy", "lambda_deploy"),
    "code.lint": ("lint_", "check_code", "type_check", "static_analysis"),
    "vector.query": ("vector_search", "similarity_search", "pinecone_query"),
    "vector.upsert": ("vector_upsert", "embed_and_store", "pinecone_upsert"),
    "vector.delete": ("vector_delete", "pinecone_delete", "remove_embedding", "delete_vectors"),
    "memory.read": ("memory_read", "recall_", "retrieve_memory", "rag_query", "knowledge_search"),
    "memory.write": ("memory_write", "memorize_", "store_memory", "rag_ingest", "knowledge_store"),
    "memory.delete": ("memory_delete", "forget_", "clear_memory", "rag_delete"),
    "reasoning.plan": ("plan_", "create_plan", "decompose_", "reason_"),
    "reasoning.reflect": ("reflect_", "self_evaluate", "critique_", "review_output"),
    "calendar.read": ("get_calendar", "list_events", "check_availability"),
    "calendar.write": ("create_event", "update_event", "schedule_meeting"),
    "payment.charge": ("charge_", "payment_", "stripe_charge", "process_payment"),
    "payment.refund": ("refund_", "issue_refund", "stripe_refund"),
    "image.generate": ("generate_image", "create_image", "dalle_", "image_gen", "text_to_image"),
    "image.edit": ("edit_image", "inpaint_", "outpaint_", "image_edit"),
    "video.generate": ("generate_video", "create_video", "text_to_video", "runway_"),
    "video.transcode": ("transcode_", "encode_video", "ffmpeg_"),
    "audio.generate": ("generate_audio", "text_to_speech", "tts_", "elevenlabs_"),
    "audio.transcribe": ("transcribe_", "speech_to_text", "whisper_", "deepgram_"),
    "vision.analyze": ("analyze_image", "vision_", "describe_image", "image_understand", "gpt4v_"),
    "vision.ocr": ("ocr_", "extract_text", "read_document", "document_ocr"),
    "vision.parse_document": ("parse_document", "extract_form", "pdf_extract", "document_parse", "parse_pdf"),
    "social.post.create": ("post_tweet", "create_post", "publish_", "tweet_", "linkedin_post"),
    "social.post.delete": ("delete_post", "delete_tweet", "remove_post"),
    "social.dm.send": ("send_dm", "send_message", "dm_", "direct_message"),
    "notification.push.send": ("send_push", "push_notification", "fcm_", "apns_", "notify_"),
    "notification.webhook.trigger": ("trigger_webhook", "send_webhook", "webhook_notify"),
    "storage.upload": ("upload_file", "s3_put", "gcs_upload", "blob_upload"),
    "storage.download": ("download_file", "s3_get", "gcs_download", "blob_download"),
    "storage.delete": ("delete_object", "s3_delete", "gcs_delete", "blob_delete"),
    "document.create": ("create_doc", "create_document", "new_page", "notion_create"),
    "document.edit": ("edit_doc", "update_document", "modify_page", "notion_update", "gdocs_edit"),
    "document.share": ("share_doc", "share_document", "grant_access", "set_permissions"),
}

_BY_LENGTH = sorted(
    ((prefix, kind) for kind, prefixes in MCP_TOOL_PREFIXES.items() for prefix in prefixes),
    key=lambda pair: -len(pair[0]),
)


def kind_for_tool(name: str) -> str:
    """The action kind the spec's prefix convention gives the MCP tool ``name``, else ``unknown.call``."""
    lowered = name.lower()
    return next((kind for prefix, kind in _BY_LENGTH if lowered.startswith(prefix)), FALLBACK_KIND)


def annotated_kind(tool: Any) -> str | None:
    """The ``x-cycles-action-kind`` a tool definition (an MCP ``Tool``) carries, if a usable one:
    its ``inputSchema``'s, else its ``_meta``'s. A value that is not a kind string (1 to 64
    characters) is ignored with a warning, as if absent."""
    for where, holder in (("inputSchema", getattr(tool, "input_schema", None)), ("_meta", getattr(tool, "meta", None))):
        value = holder.get(ANNOTATION) if isinstance(holder, Mapping) else None
        if value is None:
            continue
        if isinstance(value, str) and 1 <= len(value) <= 64 and value.strip() == value:
            if value not in KIND_RISK and not value.startswith("custom."):
                log.warning("tool %s: unregistered action kind %r (%s): side_effect", tool.name, value, where)
            return value
        log.warning("tool %s: ignoring %s %s=%r (not an action kind string)", tool.name, where, ANNOTATION, value)
    return None


def is_undeclared_custom(kind: str) -> bool:
    """A ``custom.*`` kind this process has not declared (``cycles.ledger.custom_kinds``): the spec
    refuses it. The gate refuses it before reserving; the ledger would too."""
    return kind.startswith("custom.") and custom_kinds.declared(kind) is None
