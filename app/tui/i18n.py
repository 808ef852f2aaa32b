"""Interface strings in English and French, and the language they are chosen in.

The language comes from an explicit ``lang`` argument, else from the locale variables in POSIX
order of precedence (LC_ALL, then LC_MESSAGES, then LANG): ``fr_FR.UTF-8`` gives French.
Every key of ``ENGLISH`` must exist in every other table (a test checks it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from model.sizes import format_bytes, format_number

DEFAULT_LANGUAGE = "en"

ENGLISH: dict[str, str] = {
    # Roles and chat
    "role.user": "You",
    "role.assistant": "Assistant",
    "role.system": "System",
    "chat.welcome": "Ask anything. **Enter** sends, **Shift+Enter** or **Ctrl+J** adds a line, "
    "**F1** lists every key.",
    "chat.conversations": "Chats",
    "chat.no_conversations": "No saved chats yet",
    "prompt.placeholder": "Message the model (Enter to send, Shift+Enter for a new line)",
    "prompt.editing": "Editing your last message (Esc to cancel the edit)",
    "prompt.paste_marker": "paste {number}: {chars} chars",
    "message.stopped": "stopped",
    "message.truncated": "reached the token limit",
    "message.interrupted": "interrupted (the app closed while writing)",
    "message.tokens": "{tokens} tokens",
    "message.tokens_one": "{tokens} token",
    "message.speed": "{tps} tok/s",
    "message.waiting_for_model": "waiting for the model to load: sent as soon as it is ready (Esc takes it back)",
    "message.display_cut": "… {chars} more characters not shown here",
    # Status bar
    "status.loading": "loading the model…",
    "status.ready": "ready",
    "status.via_server": "{name} (server {server})",
    "status.waiting": "waiting for the model…",
    "status.starting": "starting…",
    "status.reading_start": "reading the prompt ({tokens} tokens)…",
    "status.writing": "writing… {tokens} tokens",
    "status.reading": "reading the prompt {read}/{total} · {rate} tok/s · {left} left",
    "status.no_model": "no model",
    "status.context": "ctx {used}/{total}",
    "status.speed": "{tps} tok/s",
    "status.memory": "{memory}",
    "status.speed_unknown": "— tok/s",
    "status.expert_cache": "experts {rate} cached",
    "status.memory_unknown": "— GB",
    # Notices and notifications
    "notice.loading_model": "Loading the model, one moment…",
    "notice.model_loaded": "Model ready: {name}",
    "notice.no_chat_template": "This model has no chat template: replies continue the text.",
    "notice.experts_stream": "The model needs {need}, more than the memory available: its "
    "experts are read from disk on demand within a {budget} budget ({cached} % cached, "
    "context {context} tokens). Replies are slower; `mixchat info` predicts the speed.",
    "status.experts_stream": "ready · experts from disk ({budget})",
    "notice.model_failed": "The model could not be loaded: {error}",
    "notice.context_trimmed": "The chat is longer than the model's context: the {count} oldest "
    "messages are left out of what the model sees.",
    "notice.max_tokens_reduced": "Only {count} tokens of room are left in the context for the reply.",
    "notice.prompt_too_long": "This message is too long for the model's context "
    "({tokens} tokens, the context holds {context}). Shorten it.",
    "notice.error": "Error: {error}",
    "notice.long_prompt": "This prompt is {tokens} tokens: reading it takes about {left} more. Esc stops it.",
    "notice.stopped_reading": "Stopped while reading the prompt ({read} of {total} tokens "
    "read): nothing was written.",
    "notice.unknown_language": "The interface speaks English and French only: “{lang}” is not one of them, so it is in English.",
    "notify.still_loading": "The model is still loading.",
    "notify.busy": "A reply is being written: press Esc to stop it first.",
    "notify.long_paste": "This paste is {tokens} tokens: the model will take about {left} to "
    "read it (Esc stops it).",
    "notify.waiting": "A message is waiting for the model to load: press Esc to take it back first.",
    "notify.how_to_quit": "Ctrl+Q quits (Ctrl+C stops a reply being written).",
    "notify.nothing_to_regenerate": "There is no reply to regenerate.",
    "notify.nothing_to_edit": "There is no message to edit.",
    "notify.nothing_to_copy": "There is no reply to copy.",
    "notify.copied": "Reply copied to the clipboard ({tool}).",
    "notify.copied_osc52": "Reply sent to the terminal (OSC 52): it may not have reached the clipboard (no pbcopy, wl-copy or xclip here; in tmux: set-clipboard on).",
    "notify.exported": "Chat exported to {path}",
    "notify.export_failed": "Export failed: {error}",
    "notify.no_chat": "This chat is empty: send a message first.",
    "notify.renamed": "Chat renamed.",
    "notify.deleted": "Chat deleted.",
    "notify.settings_saved": "Chat settings saved.",
    "notify.empty_prompt": "Type a message first.",
    # Experts panel
    "experts.title": "Experts (last reply)",
    "experts.dense": "Dense model — no experts.",
    "experts.waiting": "Send a message to see which experts each layer uses.",
    "experts.legend": "tokens routed to each expert, per layer",
    "experts.layer_short": "L",
    "experts.total": "{tokens} tokens",
    "experts.no_model": "The model is not loaded yet.",
    "experts.server": "Expert routing is not available through the server (`mixchat chat --local` shows it).",
    # Settings screen
    "settings.title": "Chat settings",
    "settings.system_prompt": "System prompt",
    "settings.temperature": "Temperature (0–2)",
    "settings.top_p": "Top-p (0–1)",
    "settings.max_tokens": "Max reply tokens",
    "settings.reply_language": "Reply language",
    "settings.reply_language.any": "Same as the question",
    "settings.safe_mode": "Safe mode (guardrail)",
    "settings.save": "Save",
    "settings.cancel": "Cancel",
    "settings.invalid": "Invalid value: {field}",
    # Model screen
    "model.title": "Model",
    "model.name": "Name",
    "model.context_length": "Context length",
    "model.not_loaded": "The model is not loaded yet.",
    "model.close": "Close",
    "model.field.architecture": "Architecture",
    "model.field.format": "Format",
    "model.field.path": "Path",
    "model.field.num_layers": "Layers",
    "model.field.hidden_size": "Hidden size",
    "model.field.num_experts": "Experts per layer",
    "model.field.experts_per_token": "Experts per token",
    "model.field.total_params": "Parameters",
    "model.field.active_params": "Active parameters per token",
    "model.field.quantization": "Quantization",
    "model.field.size_bytes": "Size on disk",
    "model.field.memory_bytes": "Weights in memory",
    "model.field.kv_bytes_per_token": "KV cache per token",
    "model.field.context_length": "Context length",
    "model.field.sliding_window": "Sliding window",
    "model.billions": "B",
    "model.yes": "yes",
    "model.no": "no",
    # Other screens
    "rename.title": "Rename chat",
    "export.title": "Export the chat as Markdown to",
    "export.ok": "Export",
    "rename.ok": "Rename",
    "delete.title": "Delete this chat?",
    "delete.body": "“{title}” and all its messages will be deleted.",
    "delete.ok": "Delete",
    "dialog.cancel": "Cancel",
    "help.title": "Keys and actions",
    "help.key": "Key",
    "help.action": "Action",
    "help.palette": "Every action is also in the command palette (Ctrl+P). Esc closes this window.",
    # Actions (footer, help screen, command palette)
    "action.cancel": "Stop",
    "action.new_chat": "New",
    "action.regenerate": "Regenerate",
    "action.edit_last": "Edit",
    "action.copy_reply": "Copy",
    "action.settings": "Settings",
    "action.toggle_experts": "Experts",
    "action.toggle_sidebar": "Chats",
    "action.model_info": "Model",
    "action.rename_chat": "Rename",
    "action.delete_chat": "Delete",
    "action.export_chat": "Export",
    "action.help": "Help",
    "action.interrupt": "Stop",
    "help.send": "Send the message",
    "help.newline": "New line in the message",
    "help.focus": "Move between the chats, the conversation and the prompt",
    "help.palette_key": "Command palette: every action by name",
    "help.quit": "Quit (a reply being written is saved)",
    "command.new_chat": "Start a new chat",
    "command.regenerate": "Write the last reply again",
    "command.edit_last": "Edit and resend your last message",
    "command.copy_reply": "Copy the last reply to the clipboard",
    "command.settings": "System prompt, temperature, top-p, max tokens, language, safe mode",
    "command.toggle_experts": "Show or hide which experts each layer uses",
    "command.toggle_sidebar": "Show or hide the list of saved chats",
    "command.model_info": "Architecture, experts, parameters, quantization, size",
    "command.rename_chat": "Give this chat another title",
    "command.delete_chat": "Delete this chat and its messages",
    "command.export_chat": "Save this chat as a Markdown file",
    "command.help": "List every key and action",
    "command.cancel": "Stop the reply being written (keeps what was written)",
    "command.interrupt": "Stop the reply being written, as Esc does",
    # Textual's own commands in the palette
    "palette.placeholder": "Search for commands…",
    "system.theme": "Theme",
    "system.theme.help": "Change the colours of the interface",
    "system.quit": "Quit",
    "system.quit.help": "Quit the app (a reply being written is saved)",
    "system.keys": "Keys",
    "system.keys.help": "Show the keys of the focused part of the screen",
    "system.keys.hide": "Hide the keys panel",
    "system.maximize": "Maximize",
    "system.maximize.help": "Give the focused part the whole screen",
    "system.minimize": "Minimize",
    "system.minimize.help": "Give the focused part its usual size back",
    "system.screenshot": "Screenshot",
    "system.screenshot.help": "Save the screen as an SVG image",
    "system.theme_placeholder": "Search for themes…",
}

FRENCH: dict[str, str] = {
    "role.user": "Vous",
    "role.assistant": "Assistant",
    "role.system": "Système",
    "chat.welcome": "Posez votre question. **Entrée** envoie, **Maj+Entrée** ou **Ctrl+J** ajoute "
    "une ligne, **F1** liste toutes les touches.",
    "chat.conversations": "Discussions",
    "chat.no_conversations": "Aucune discussion enregistrée",
    "prompt.placeholder": "Écrivez au modèle (Entrée pour envoyer, Maj+Entrée pour un saut de ligne)",
    "prompt.editing": "Modification de votre dernier message (Échap pour annuler)",
    "prompt.paste_marker": "collage {number} : {chars} caractères",
    "message.stopped": "interrompu",
    "message.truncated": "limite de jetons atteinte",
    "message.interrupted": "interrompu (l’application s’est fermée pendant l’écriture)",
    "message.tokens": "{tokens} jetons",
    "message.tokens_one": "{tokens} jeton",
    "message.speed": "{tps} jetons/s",
    "message.waiting_for_model": "en attente du chargement du modèle : envoyé dès qu’il est prêt (Échap le reprend)",
    "message.display_cut": "… {chars} caractères de plus non affichés ici",
    "status.loading": "chargement du modèle…",
    "status.ready": "prêt",
    "status.via_server": "{name} (serveur {server})",
    "status.waiting": "en attente du modèle…",
    "status.starting": "démarrage…",
    "status.reading_start": "lecture du prompt ({tokens} jetons)…",
    "status.writing": "écriture… {tokens} jetons",
    "status.reading": "lecture du prompt {read}/{total} · {rate} jetons/s · encore {left}",
    "status.no_model": "aucun modèle",
    "status.context": "ctx {used}/{total}",
    "status.speed": "{tps} jetons/s",
    "status.memory": "{memory}",
    "status.speed_unknown": "— jetons/s",
    "status.expert_cache": "experts {rate} en cache",
    "status.memory_unknown": "— Go",
    "notice.loading_model": "Chargement du modèle, un instant…",
    "notice.model_loaded": "Modèle prêt : {name}",
    "notice.experts_stream": "Le modèle a besoin de {need}, plus que la mémoire disponible : "
    "ses experts sont lus sur le disque à la demande, dans un budget de {budget} ({cached} % en "
    "cache, contexte de {context} jetons). Les réponses sont plus lentes ; `mixchat info` "
    "prédit la vitesse.",
    "status.experts_stream": "prêt · experts lus sur le disque ({budget})",
    "notice.no_chat_template": "Ce modèle n’a pas de modèle de discussion : les réponses "
    "continuent le texte.",
    "notice.model_failed": "Le modèle n’a pas pu être chargé : {error}",
    "notice.context_trimmed": "La discussion dépasse le contexte du modèle : les {count} messages "
    "les plus anciens ne lui sont plus transmis.",
    "notice.max_tokens_reduced": "Il ne reste que {count} jetons de place dans le contexte pour "
    "la réponse.",
    "notice.prompt_too_long": "Ce message est trop long pour le contexte du modèle "
    "({tokens} jetons, le contexte en contient {context}). Raccourcissez-le.",
    "notice.error": "Erreur : {error}",
    "notice.long_prompt": "Ce prompt fait {tokens} jetons : sa lecture prend encore environ {left}. Échap l’arrête.",
    "notice.stopped_reading": "Arrêté pendant la lecture du prompt ({read} jetons lus sur "
    "{total}) : rien n’a été écrit.",
    "notice.unknown_language": "L’interface ne parle que l’anglais et le français : « {lang} » n’en fait pas partie, elle est donc en anglais.",
    "notify.still_loading": "Le modèle est encore en cours de chargement.",
    "notify.busy": "Une réponse est en cours : appuyez sur Échap pour l’arrêter d’abord.",
    "notify.long_paste": "Ce collage fait {tokens} jetons : le modèle mettra environ {left} "
    "à le lire (Échap l’arrête).",
    "notify.waiting": "Un message attend le chargement du modèle : appuyez sur Échap pour le reprendre d’abord.",
    "notify.how_to_quit": "Ctrl+Q quitte (Ctrl+C arrête une réponse en cours).",
    "notify.nothing_to_regenerate": "Aucune réponse à régénérer.",
    "notify.nothing_to_edit": "Aucun message à modifier.",
    "notify.nothing_to_copy": "Aucune réponse à copier.",
    "notify.copied": "Réponse copiée dans le presse-papiers ({tool}).",
    "notify.copied_osc52": "Réponse envoyée au terminal (OSC 52) : elle n’a peut-être pas atteint le presse-papiers (ni pbcopy, ni wl-copy, ni xclip ici ; dans tmux : set-clipboard on).",
    "notify.exported": "Discussion exportée vers {path}",
    "notify.export_failed": "Échec de l’export : {error}",
    "notify.no_chat": "Cette discussion est vide : envoyez d’abord un message.",
    "notify.renamed": "Discussion renommée.",
    "notify.deleted": "Discussion supprimée.",
    "notify.settings_saved": "Réglages de la discussion enregistrés.",
    "notify.empty_prompt": "Écrivez d’abord un message.",
    "experts.title": "Experts (dernière réponse)",
    "experts.dense": "Modèle dense — pas d’experts.",
    "experts.waiting": "Envoyez un message pour voir quels experts chaque couche utilise.",
    "experts.legend": "jetons envoyés à chaque expert, par couche",
    "experts.layer_short": "C",
    "experts.total": "{tokens} jetons",
    "experts.no_model": "Le modèle n’est pas encore chargé.",
    "experts.server": "Le routage des experts n’est pas disponible via le serveur (`mixchat chat --local` le montre).",
    "settings.title": "Réglages de la discussion",
    "settings.system_prompt": "Prompt système",
    "settings.temperature": "Température (0–2)",
    "settings.top_p": "Top-p (0–1)",
    "settings.max_tokens": "Jetons max. par réponse",
    "settings.reply_language": "Langue des réponses",
    "settings.reply_language.any": "Celle de la question",
    "settings.safe_mode": "Mode sûr (garde-fou)",
    "settings.save": "Enregistrer",
    "settings.cancel": "Annuler",
    "settings.invalid": "Valeur invalide : {field}",
    "model.title": "Modèle",
    "model.name": "Nom",
    "model.context_length": "Longueur du contexte",
    "model.not_loaded": "Le modèle n’est pas encore chargé.",
    "model.close": "Fermer",
    "model.field.architecture": "Architecture",
    "model.field.format": "Format",
    "model.field.path": "Chemin",
    "model.field.num_layers": "Couches",
    "model.field.hidden_size": "Taille cachée",
    "model.field.num_experts": "Experts par couche",
    "model.field.experts_per_token": "Experts par jeton",
    "model.field.total_params": "Paramètres",
    "model.field.active_params": "Paramètres actifs par jeton",
    "model.field.quantization": "Quantification",
    "model.field.size_bytes": "Taille sur disque",
    "model.field.memory_bytes": "Poids en mémoire",
    "model.field.kv_bytes_per_token": "Cache KV par jeton",
    "model.field.context_length": "Longueur du contexte",
    "model.field.sliding_window": "Fenêtre glissante",
    "model.billions": "Md",
    "model.yes": "oui",
    "model.no": "non",
    "rename.title": "Renommer la discussion",
    "export.title": "Exporter la discussion en Markdown vers",
    "export.ok": "Exporter",
    "rename.ok": "Renommer",
    "delete.title": "Supprimer cette discussion ?",
    "delete.body": "« {title} » et tous ses messages seront supprimés.",
    "delete.ok": "Supprimer",
    "dialog.cancel": "Annuler",
    "help.title": "Touches et actions",
    "help.key": "Touche",
    "help.action": "Action",
    "help.palette": "Toutes les actions sont aussi dans la palette de commandes (Ctrl+P). Échap ferme cette fenêtre.",
    "action.cancel": "Arrêter",
    "action.new_chat": "Nouvelle",
    "action.regenerate": "Relancer",
    "action.edit_last": "Éditer",
    "action.copy_reply": "Copier",
    "action.settings": "Réglages",
    "action.toggle_experts": "Experts",
    "action.toggle_sidebar": "Discussions",
    "action.model_info": "Modèle",
    "action.rename_chat": "Renommer",
    "action.delete_chat": "Supprimer",
    "action.export_chat": "Exporter",
    "action.help": "Aide",
    "action.interrupt": "Arrêter",
    "help.send": "Envoyer le message",
    "help.newline": "Saut de ligne dans le message",
    "help.focus": "Passer des discussions à la conversation et à la saisie",
    "help.palette_key": "Palette de commandes : toutes les actions par leur nom",
    "help.quit": "Quitter (une réponse en cours est enregistrée)",
    "command.new_chat": "Commencer une nouvelle discussion",
    "command.regenerate": "Réécrire la dernière réponse",
    "command.edit_last": "Modifier et renvoyer votre dernier message",
    "command.copy_reply": "Copier la dernière réponse dans le presse-papiers",
    "command.settings": "Prompt système, température, top-p, jetons max., langue, mode sûr",
    "command.toggle_experts": "Afficher ou masquer les experts utilisés par chaque couche",
    "command.toggle_sidebar": "Afficher ou masquer la liste des discussions",
    "command.model_info": "Architecture, experts, paramètres, quantification, taille",
    "command.rename_chat": "Donner un autre titre à cette discussion",
    "command.delete_chat": "Supprimer cette discussion et ses messages",
    "command.export_chat": "Enregistrer cette discussion en fichier Markdown",
    "command.help": "Lister toutes les touches et actions",
    "command.cancel": "Arrêter la réponse en cours (garde ce qui est écrit)",
    "command.interrupt": "Arrêter la réponse en cours, comme Échap",
    "palette.placeholder": "Chercher une commande…",
    "system.theme": "Thème",
    "system.theme.help": "Changer les couleurs de l’interface",
    "system.quit": "Quitter",
    "system.quit.help": "Quitter l’application (une réponse en cours est enregistrée)",
    "system.keys": "Touches",
    "system.keys.help": "Afficher les touches de la partie active de l’écran",
    "system.keys.hide": "Masquer le panneau des touches",
    "system.maximize": "Agrandir",
    "system.maximize.help": "Donner tout l’écran à la partie active",
    "system.minimize": "Réduire",
    "system.minimize.help": "Rendre à la partie active sa taille habituelle",
    "system.screenshot": "Capture d’écran",
    "system.screenshot.help": "Enregistrer l’écran en image SVG",
    "system.theme_placeholder": "Chercher un thème…",
}

TABLES: dict[str, dict[str, str]] = {"en": ENGLISH, "fr": FRENCH}

# Names of keys as printed on keyboards, where a language names them differently.
KEY_NAMES: dict[str, dict[str, str]] = {
    "fr": {"Enter": "Entrée", "Shift": "Maj", "Esc": "Échap"},
}

# Languages a reply can be asked in: code -> (name in English for the model, name shown).
REPLY_LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("English", "English"),
    "fr": ("French", "Français"),
    "es": ("Spanish", "Español"),
    "de": ("German", "Deutsch"),
    "it": ("Italian", "Italiano"),
    "pt": ("Portuguese", "Português"),
    "nl": ("Dutch", "Nederlands"),
    "zh": ("Chinese", "中文"),
    "ja": ("Japanese", "日本語"),
    "ko": ("Korean", "한국어"),
    "ar": ("Arabic", "العربية"),
    "ru": ("Russian", "Русский"),
    "hi": ("Hindi", "हिन्दी"),
}


def language_from_locale(value: str) -> str | None:
    """``fr_FR.UTF-8`` → ``fr``; ``C``/``POSIX``/unknown → None."""
    code = value.split(".", 1)[0].split("@", 1)[0].replace("-", "_").split("_", 1)[0].lower()
    return code if code in TABLES else None


def detect_language(environ: Mapping[str, str] | None = None) -> str:
    """The interface language from LC_ALL, LC_MESSAGES, LANG (the first one that is set)."""
    environ = os.environ if environ is None else environ
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(variable, "").strip()
        if value:
            return language_from_locale(value) or DEFAULT_LANGUAGE
    return DEFAULT_LANGUAGE


def unsupported_language(lang: str | None) -> bool:
    """True when ``lang`` asks for a language the interface does not have (``de``)."""
    return bool(lang) and language_from_locale(lang or "") is None


def resolve_language(lang: str | None, environ: Mapping[str, str] | None = None) -> str:
    """An explicit ``lang`` (``fr``, ``fr_FR``…) wins over the locale; unknown falls back to English."""
    if lang:
        return language_from_locale(lang) or DEFAULT_LANGUAGE
    return detect_language(environ)


class Strings:
    """Look up interface strings: ``strings("notify.exported", path=p)``."""

    def __init__(self, language: str = DEFAULT_LANGUAGE) -> None:
        self.language = language if language in TABLES else DEFAULT_LANGUAGE
        self._table = TABLES[self.language]

    def key_name(self, keys: str) -> str:
        """``Shift+Enter`` → ``Maj+Entrée`` in French; unchanged where names are the same."""
        names = KEY_NAMES.get(self.language, {})
        return re.sub(r"[A-Za-z]+", lambda m: names.get(m.group(0), m.group(0)), keys)

    def number(self, value: float, decimals: int = 0) -> str:
        """8192 -> '8,192' (English) or '8 192' (French); decimals with '.' or ','."""
        return format_number(value, decimals, self.language)

    def bytes(self, n: float) -> str:
        """1.25e9 -> '1.25 GB' or '1,25 Go'."""
        return format_bytes(n, self.language)

    def duration(self, seconds: float) -> str:
        """'45 s', '2 min 05 s', '1 h 03 min' (the same in both languages)."""
        seconds = max(0, round(seconds))
        if seconds < 60:
            return f"{seconds} s"
        if seconds < 3600:
            return f"{seconds // 60} min {seconds % 60:02d} s"
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

    def has(self, key: str) -> bool:
        return key in ENGLISH

    def __call__(self, key: str, **values: object) -> str:
        template = self._table.get(key) or ENGLISH.get(key) or key
        return template.format(**values) if values else template
