"""The patient portal's page words in the patient's language (`Patient.communication`), else English."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.generation.languages import match_language_tag

# Machine-drafted like the handout templates (templates/prompts/languages): short, plain, reviewed with them.
_WORDS: dict[str, dict[str, str]] = {
    "en": {
        "page_title": "Your pictures",
        "title": "Pictures from your care team",
        "intro": (
            "These pictures were made with an AI tool. Your care team checked each "
            "one before adding it to your record."
        ),
        "description": "What the picture shows",
        "language": "Language",
        "added": "Added",
        "checked_by": "Checked by",
        "handout": "Open the handout to print (PDF)",
        "empty": "Your care team has not added any pictures to your record yet.",
        "signed_in_as": "Signed in as",
        "sign_out": "Sign out",
        "you": "you",
    },
    "es": {
        "page_title": "Sus imágenes",
        "title": "Imágenes de su equipo de salud",
        "intro": (
            "Estas imágenes se hicieron con una herramienta de IA. Su equipo de "
            "salud revisó cada una antes de agregarla a su expediente."
        ),
        "description": "Lo que muestra la imagen",
        "language": "Idioma",
        "added": "Agregada",
        "checked_by": "Revisada por",
        "handout": "Abrir la hoja para imprimir (PDF)",
        "empty": "Su equipo de salud todavía no ha agregado imágenes a su expediente.",
        "signed_in_as": "Sesión de",
        "sign_out": "Cerrar sesión",
        "you": "usted",
    },
    "vi": {
        "page_title": "Hình ảnh của bạn",
        "title": "Hình ảnh từ nhóm chăm sóc của bạn",
        "intro": (
            "Những hình này được làm bằng công cụ AI. Nhóm chăm sóc đã xem từng "
            "hình trước khi thêm vào hồ sơ của bạn."
        ),
        "description": "Hình cho thấy",
        "language": "Ngôn ngữ",
        "added": "Ngày thêm",
        "checked_by": "Người xem lại",
        "handout": "Mở tờ hướng dẫn để in (PDF)",
        "empty": "Nhóm chăm sóc chưa thêm hình nào vào hồ sơ của bạn.",
        "signed_in_as": "Đăng nhập với tên",
        "sign_out": "Đăng xuất",
        "you": "bạn",
    },
    "zh-Hans": {
        "page_title": "您的图片",
        "title": "您的医疗团队提供的图片",
        "intro": "这些图片由人工智能工具制作。您的医疗团队在加入您的病历前检查了每一张。",
        "description": "图片内容",
        "language": "语言",
        "added": "添加日期",
        "checked_by": "检查人",
        "handout": "打开可打印的说明（PDF）",
        "empty": "您的医疗团队还没有在您的病历中添加图片。",
        "signed_in_as": "登录身份",
        "sign_out": "退出",
        "you": "您",
    },
    "tl": {
        "page_title": "Ang iyong mga larawan",
        "title": "Mga larawan mula sa iyong care team",
        "intro": (
            "Ginawa ang mga larawang ito gamit ang AI. Sinuri ng iyong care team "
            "ang bawat isa bago idagdag sa iyong record."
        ),
        "description": "Ang ipinapakita ng larawan",
        "language": "Wika",
        "added": "Idinagdag",
        "checked_by": "Sinuri ni",
        "handout": "Buksan ang handout para i-print (PDF)",
        "empty": "Wala pang larawang idinagdag ang iyong care team sa iyong record.",
        "signed_in_as": "Naka-sign in bilang",
        "sign_out": "Mag-sign out",
        "you": "ikaw",
    },
    "ar": {
        "page_title": "صورك",
        "title": "صور من فريق رعايتك",
        "intro": "صُنعت هذه الصور بأداة ذكاء اصطناعي. راجع فريق رعايتك كل صورة قبل إضافتها إلى سجلك.",
        "description": "ما تُظهره الصورة",
        "language": "اللغة",
        "added": "أُضيفت",
        "checked_by": "راجعها",
        "handout": "افتح النشرة للطباعة (PDF)",
        "empty": "لم يُضف فريق رعايتك أي صور إلى سجلك بعد.",
        "signed_in_as": "تسجيل الدخول باسم",
        "sign_out": "تسجيل الخروج",
        "you": "أنت",
    },
    "ko": {
        "page_title": "내 그림",
        "title": "의료진이 보낸 그림",
        "intro": "이 그림들은 AI 도구로 만들었습니다. 의료진이 기록에 넣기 전에 하나씩 확인했습니다.",
        "description": "그림 설명",
        "language": "언어",
        "added": "추가한 날",
        "checked_by": "확인한 사람",
        "handout": "인쇄용 안내문 열기 (PDF)",
        "empty": "의료진이 아직 기록에 그림을 넣지 않았습니다.",
        "signed_in_as": "로그인한 사람",
        "sign_out": "로그아웃",
        "you": "나",
    },
    "ru": {
        "page_title": "Ваши картинки",
        "title": "Картинки от вашей медицинской команды",
        "intro": (
            "Эти картинки сделаны с помощью ИИ. Ваша команда проверила каждую, "
            "прежде чем добавить её в вашу карту."
        ),
        "description": "Что на картинке",
        "language": "Язык",
        "added": "Добавлено",
        "checked_by": "Проверил(а)",
        "handout": "Открыть памятку для печати (PDF)",
        "empty": "Ваша медицинская команда ещё не добавила картинки в вашу карту.",
        "signed_in_as": "Вы вошли как",
        "sign_out": "Выйти",
        "you": "вы",
    },
}
_RIGHT_TO_LEFT = frozenset({"ar"})
_NAMES = {
    "en": "English",
    "es": "Español",
    "vi": "Tiếng Việt",
    "zh-Hans": "中文（简体）",
    "tl": "Tagalog",
    "ar": "العربية",
    "ko": "한국어",
    "ru": "Русский",
}
PORTAL_LANGUAGES: tuple[str, ...] = tuple(_WORDS)


@dataclass(frozen=True)
class PortalWords:
    """The page's words, its `lang` and `dir`."""

    lang: str
    direction: str
    words: Mapping[str, str]

    def __getitem__(self, key: str) -> str:
        return self.words[key]


def portal_language(tag: str | None) -> str | None:
    """Our portal language for a BCP-47 tag ("es-MX" → es, "zh"/"zh-CN" → zh-Hans, "fil" → tl), else None.

    The same matching as the handouts' (`match_language_tag`), over the languages the portal has words for.
    """
    return match_language_tag(tag, PORTAL_LANGUAGES) if tag else None


def preferred_tags(patient: Mapping[str, Any]) -> list[str]:
    """`Patient.communication` language codes, preferred first."""
    entries = [entry for entry in patient.get("communication") or [] if isinstance(entry, Mapping)]
    entries.sort(key=lambda entry: not entry.get("preferred"))
    tags = []
    for entry in entries:
        language = entry.get("language")
        if not isinstance(language, Mapping):
            continue
        for coding in language.get("coding") or []:
            if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                tags.append(coding["code"])
    return tags


def portal_words(patient: Mapping[str, Any] | None) -> PortalWords:
    """The first of the patient's languages the portal has words for; English when none is."""
    for tag in preferred_tags(patient or {}):
        lang = portal_language(tag)
        if lang is not None:
            return words_for(lang)
    return words_for("en")


def words_for(lang: str) -> PortalWords:
    return PortalWords(lang=lang, direction="rtl" if lang in _RIGHT_TO_LEFT else "ltr", words=_WORDS[lang])


def language_name(tag: str) -> str:
    lang = portal_language(tag)
    return _NAMES[lang] if lang is not None else tag
