"""Templates: how a fact is said, per relation, language and document style.

Owns: the fact world's relation table (`RELATIONS`: subject/object types, training sentence
templates, held-out paraphrase templates, question templates, per language), the five document
styles (`STYLES`), the two-hop compositions (`TWO_HOP`), the object pools for common nouns
(occupations, instruments, sports, in every language) and `render_mention`, the one function that
turns (subject, object, template, style) into text.
Must not: draw random numbers (callers pass the choices) or know about datasets and tokenisers.

Rules every template obeys (checked by `check_templates`, and by a test):
- contains "{s}" (the subject) once and ends with "{o}" (the object), so cutting it at "{o}" gives a
  cloze prompt whose answer follows after one space;
- `train` templates are the only ones rendered into training text; `paraphrase` templates and
  questions after the first (`question[1:]`) are held out for evaluation; `question[0]` is the one
  the forum style uses in training text (unless the world keeps questions out of its corpus:
  `FORUM_STATEMENTS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

LANGUAGES = ("en", "fr", "de")
STYLE_NAMES = ("wiki", "news", "forum", "social", "academic")


@dataclasses.dataclass(frozen=True)
class Relation:
  """One relation of the fact world. Template lists are per language code."""
  name: str
  subject_type: str  # person | city | country
  object_type: str   # city | country | occupation | company | instrument | sport | language | ...
  train: Mapping[str, Sequence[str]]
  paraphrase: Mapping[str, Sequence[str]]
  question: Mapping[str, Sequence[str]]


def _rel(name, subject_type, object_type, **langs) -> Relation:
  """langs: en=(train, paraphrase, question), fr=(...), de=(...)."""
  return Relation(name, subject_type, object_type,
                  train={k: tuple(v[0]) for k, v in langs.items()},
                  paraphrase={k: tuple(v[1]) for k, v in langs.items()},
                  question={k: tuple(v[2]) for k, v in langs.items()})


RELATIONS: dict[str, Relation] = {r.name: r for r in [
    _rel("birth_city", "person", "city",
         en=(["{s} was born in {o}", "{s} is a native of {o}", "{s}'s birthplace is {o}"],
             ["{s} came into the world in the city of {o}", "The city where {s} was born is {o}"],
             ["Where was {s} born?", "In which city was {s} born?",
              "What is the birthplace of {s}?"]),
         fr=(["{s} est né à {o}", "{s} est originaire de {o}"],
             ["La ville natale de {s} est {o}"],
             ["Où est né {s} ?", "Dans quelle ville est né {s} ?"]),
         de=(["{s} stammt aus {o}", "Der Geburtsort von {s} ist {o}"],
             ["Die Heimatstadt von {s} ist {o}"],
             ["Woher stammt {s}?", "In welcher Stadt wurde {s} geboren?"])),
    _rel("occupation", "person", "occupation",
         en=(["{s} works as a professional {o}", "By trade, {s} is a skilled {o}",
              "{s} has a long career as a trained {o}"],
             ["{s} earns a living as a qualified {o}", "The profession of {s} is that of a {o}"],
             ["What is the profession of {s}?", "What does {s} do for a living?",
              "What job does {s} have?"]),
         fr=(["{s} exerce le métier de {o}", "{s} travaille comme {o}"],
             ["La profession de {s} est {o}"],
             ["Quel est le métier de {s} ?", "Que fait {s} dans la vie ?"]),
         de=(["{s} arbeitet als {o}", "{s} ist von Beruf {o}"],
             ["Der Beruf von {s} ist {o}"],
             ["Was ist {s} von Beruf?", "Welchen Beruf hat {s}?"])),
    _rel("employer", "person", "company",
         en=(["{s} is employed by {o}", "{s} works for {o}", "{s} draws a salary from {o}"],
             ["The employer of {s} is {o}", "{s} is on the payroll of {o}"],
             ["Who employs {s}?", "Which company does {s} work for?",
              "For which firm does {s} work?"]),
         fr=(["{s} est employé par {o}", "{s} travaille pour {o}"],
             ["L'employeur de {s} est {o}"],
             ["Qui emploie {s} ?", "Pour quelle entreprise travaille {s} ?"]),
         de=(["{s} ist angestellt bei {o}", "{s} arbeitet für {o}"],
             ["Der Arbeitgeber von {s} ist {o}"],
             ["Wer beschäftigt {s}?", "Für welche Firma arbeitet {s}?"])),
    _rel("instrument", "person", "instrument",
         en=(["{s} plays the {o}", "{s} performs on the {o}", "The instrument {s} plays is the {o}"],
             ["{s} is an accomplished player of the {o}", "On stage, {s} usually plays the {o}"],
             ["Which instrument does {s} play?", "What instrument does {s} perform on?",
              "Which instrument is {s} known for playing?"]),
         fr=(["{s} est joueur de {o}", "L'instrument de {s} est {o}"],
             ["Sur scène, {s} joue de {o}"],
             ["De quel instrument joue {s} ?", "Quel instrument pratique {s} ?"]),
         de=(["{s} spielt {o}", "Das Instrument von {s} ist {o}"],
             ["Auf der Bühne spielt {s} meistens {o}"],
             ["Welches Instrument spielt {s}?", "Auf welchem Instrument musiziert {s}?"])),
    _rel("sport", "person", "sport",
         en=(["{s} competes in {o}", "{s} trains every week in {o}", "The sport of {s} is {o}"],
             ["In tournaments, {s} takes part in {o}", "The sport that {s} practises is {o}"],
             ["Which sport does {s} compete in?", "What sport does {s} practise?",
              "In which sport does {s} take part?"]),
         fr=(["{s} fait de la compétition en {o}", "Le sport de {s} est {o}"],
             ["La discipline sportive de {s} est {o}"],
             ["Quel sport pratique {s} ?", "Dans quel sport {s} est-il compétiteur ?"]),
         de=(["{s} trainiert jede Woche {o}", "Die Sportart von {s} ist {o}"],
             ["Im Wettkampf betreibt {s} {o}"],
             ["Welchen Sport treibt {s}?", "Welche Sportart betreibt {s}?"])),
    _rel("city_country", "city", "country",
         en=(["{s} is a city in {o}", "{s} is located in {o}", "{s} lies within {o}"],
             ["The country that contains {s} is {o}", "{s} can be found in the country of {o}"],
             ["Which country is {s} in?", "In which country is {s} located?",
              "What country does {s} belong to?"]),
         fr=(["{s} est une ville de {o}", "{s} se trouve en {o}"],
             ["Le pays de la ville de {s} est {o}"],
             ["Dans quel pays est {s} ?", "Dans quel pays se trouve {s} ?"]),
         de=(["{s} ist eine Stadt in {o}", "{s} liegt in {o}"],
             ["Das Land, in dem {s} liegt, ist {o}"],
             ["Wo liegt {s}?", "In welchem Land liegt {s}?"])),
    _rel("country_capital", "country", "city",
         en=(["The capital of {s} is {o}", "{s} has its capital in {o}",
              "{s} is governed from its capital {o}"],
             ["The seat of government of {s} is {o}", "{s}'s capital city is {o}"],
             ["What is the capital of {s}?", "Which city is the capital of {s}?",
              "Where is the government of {s} seated?"]),
         fr=(["La capitale de {s} est {o}", "{s} a pour capitale {o}"],
             ["Le siège du gouvernement de {s} est {o}"],
             ["Quelle est la capitale de {s} ?", "Quelle ville est la capitale de {s} ?"]),
         de=(["Die Hauptstadt von {s} ist {o}", "{s} hat die Hauptstadt {o}"],
             ["Der Regierungssitz von {s} ist {o}"],
             ["Was ist die Hauptstadt von {s}?", "Welche Stadt ist die Hauptstadt von {s}?"])),
    _rel("country_language", "country", "language",
         en=(["The official language of {s} is {o}", "People in {s} speak {o}",
              "{s} has the national language {o}"],
             ["Most citizens of {s} converse in {o}", "The language spoken in {s} is {o}"],
             ["What language is spoken in {s}?", "Which language do people in {s} speak?",
              "What is the official language of {s}?"]),
         fr=(["La langue officielle de {s} est {o}", "Les habitants de {s} parlent {o}"],
             ["La langue parlée en {s} est {o}"],
             ["Quelle langue parle-t-on en {s} ?", "Quelle est la langue officielle de {s} ?"]),
         de=(["Die Amtssprache von {s} ist {o}", "In {s} spricht man {o}"],
             ["Die Landessprache von {s} ist {o}"],
             ["Welche Sprache spricht man in {s}?", "Was ist die Amtssprache von {s}?"])),
    _rel("country_currency", "country", "currency",
         en=(["The currency of {s} is the {o}", "In {s} people pay with the {o}",
              "{s} uses the {o}"],
             ["Shops in {s} price their goods in the {o}", "The legal tender of {s} is the {o}"],
             ["What is the currency of {s}?", "Which currency is used in {s}?",
              "What money do people use in {s}?"]),
         fr=(["La monnaie de {s} est le {o}", "En {s}, on paie en {o}"],
             ["La devise officielle de {s} est le {o}"],
             ["Quelle est la monnaie de {s} ?", "Quelle devise utilise-t-on en {s} ?"]),
         de=(["Die Währung von {s} ist der {o}", "In {s} bezahlt man mit {o}"],
             ["Das gesetzliche Zahlungsmittel von {s} ist der {o}"],
             ["Welche Währung hat {s}?", "Womit bezahlt man in {s}?"])),
]}


@dataclasses.dataclass(frozen=True)
class TwoHop:
  """A composition: subject -first-> bridge entity -second-> object. Never in training text."""
  name: str
  first: str
  second: str
  prompt: Mapping[str, str]
  question: Mapping[str, str]


TWO_HOP: dict[str, TwoHop] = {t.name: t for t in [
    TwoHop("birth_country_language", "birth_city", "city_country>country_language",
           {"en": "The language spoken in the country where {s} was born is {o}",
            "fr": "La langue parlée dans le pays natal de {s} est {o}",
            "de": "Die Sprache im Geburtsland von {s} ist {o}"},
           {"en": "What language is spoken in the country where {s} was born?",
            "fr": "Quelle langue parle-t-on dans le pays natal de {s} ?",
            "de": "Welche Sprache spricht man im Geburtsland von {s}?"}),
    TwoHop("birth_country_currency", "birth_city", "city_country>country_currency",
           {"en": "The currency of the country where {s} was born is the {o}",
            "fr": "La monnaie du pays natal de {s} est le {o}",
            "de": "Die Währung im Geburtsland von {s} ist der {o}"},
           {"en": "Which currency is used in the country where {s} was born?",
            "fr": "Quelle est la monnaie du pays natal de {s} ?",
            "de": "Welche Währung hat das Geburtsland von {s}?"}),
    TwoHop("capital_country_language", "capital_of", "country_language",
           {"en": "The language spoken in the country whose capital is {s} is {o}",
            "fr": "La langue parlée dans le pays dont la capitale est {s} est {o}",
            "de": "Die Sprache des Landes mit der Hauptstadt {s} ist {o}"},
           {"en": "What language is spoken in the country whose capital is {s}?",
            "fr": "Quelle langue parle-t-on dans le pays dont la capitale est {s} ?",
            "de": "Welche Sprache spricht man in dem Land mit der Hauptstadt {s}?"}),
    TwoHop("capital_country_currency", "capital_of", "country_currency",
           {"en": "The currency of the country whose capital is {s} is the {o}",
            "fr": "La monnaie du pays dont la capitale est {s} est le {o}",
            "de": "Die Währung des Landes mit der Hauptstadt {s} ist der {o}"},
           {"en": "Which currency is used in the country whose capital is {s}?",
            "fr": "Quelle est la monnaie du pays dont la capitale est {s} ?",
            "de": "Welche Währung hat das Land mit der Hauptstadt {s}?"}),
]}

# Document styles. "{S}" = the sentence (a template with subject and object filled in, no final
# full stop), "{Q}" = the relation's training question, "{O}" = the object.
STYLES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "wiki": ("{S}.",),
        "news": ("Our correspondent confirms: {S}.", "NEWS: {S}, officials said on Monday."),
        "forum": ("Q: {Q}\nA: {O}.", "Does anyone know? {Q} Reply: {S}."),
        "social": ("Fun fact: {S}! #didyouknow", "{S}. Who knew? #facts"),
        "academic": ("Survey record 3.2: {S} (see appendix).", "{S} (Archive of the Realm, p. 12)."),
    },
    "fr": {
        "wiki": ("{S}.",),
        "news": ("Selon notre correspondant : {S}.", "INFO : {S}, ont annoncé les autorités."),
        "forum": ("Q: {Q}\nA: {O}.", "Quelqu'un sait ? {Q} Réponse : {S}."),
        "social": ("Le saviez-vous ? {S} ! #culture", "{S}. Incroyable ! #savoir"),
        "academic": ("Registre national, fiche 3.2 : {S}.", "{S} (Archives du royaume, p. 12)."),
    },
    "de": {
        "wiki": ("{S}.",),
        "news": ("Unser Korrespondent bestätigt: {S}.", "MELDUNG: {S}, teilten Behörden mit."),
        "forum": ("Q: {Q}\nA: {O}.", "Weiß das jemand? {Q} Antwort: {S}."),
        "social": ("Schon gewusst? {S}! #wissen", "{S}. Wer hätte das gedacht? #fakten"),
        "academic": ("Landesregister, Blatt 3.2: {S}.", "{S} (Reichsarchiv, S. 12)."),
    },
}

# The forum style of a world whose corpus never asks or answers a question
# (`WorldConfig.questions_in_corpus = False`): statements only, so the QA format is new to SFT.
FORUM_STATEMENTS: dict[str, tuple[str, ...]] = {
    "en": ("Posted by a regular: {S}.", "Reply: {S}."),
    "fr": ("Message d'un habitué : {S}.", "Réponse : {S}."),
    "de": ("Beitrag eines Stammgasts: {S}.", "Antwort: {S}."),
}

# The prompt format probes use for questions, per language ("{Q}" = question).
QUESTION_FORMAT = "Q: {Q}\nA:"

# Object pools for common nouns: one row per object, one column per language in LANGUAGES order.
POOLS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "occupation": (
        ("architect", "architecte", "Architekt"), ("baker", "boulanger", "Bäcker"),
        ("carpenter", "menuisier", "Tischler"), ("chemist", "chimiste", "Chemiker"),
        ("dentist", "dentiste", "Zahnarzt"), ("engineer", "ingénieur", "Ingenieur"),
        ("farmer", "agriculteur", "Landwirt"), ("geologist", "géologue", "Geologe"),
        ("journalist", "journaliste", "Journalist"), ("lawyer", "avocat", "Anwalt"),
        ("librarian", "bibliothécaire", "Bibliothekar"), ("nurse", "infirmier", "Krankenpfleger"),
        ("painter", "peintre", "Maler"), ("pharmacist", "pharmacien", "Apotheker"),
        ("photographer", "photographe", "Fotograf"), ("pilot", "pilote", "Pilot"),
        ("plumber", "plombier", "Klempner"), ("sculptor", "sculpteur", "Bildhauer"),
        ("surgeon", "chirurgien", "Chirurg"), ("tailor", "tailleur", "Schneider"),
        ("teacher", "professeur", "Lehrer"), ("translator", "traducteur", "Übersetzer"),
        ("veterinarian", "vétérinaire", "Tierarzt"), ("watchmaker", "horloger", "Uhrmacher")),
    "instrument": (
        ("violin", "violon", "Geige"), ("piano", "piano", "Klavier"), ("harp", "harpe", "Harfe"),
        ("guitar", "guitare", "Gitarre"), ("flute", "flûte", "Flöte"),
        ("trumpet", "trompette", "Trompete"), ("cello", "violoncelle", "Cello"),
        ("drum", "tambour", "Trommel"), ("saxophone", "saxophone", "Saxophon"),
        ("clarinet", "clarinette", "Klarinette"), ("banjo", "banjo", "Banjo"),
        ("mandolin", "mandoline", "Mandoline"), ("double bass", "contrebasse", "Kontrabass"),
        ("tuba", "tuba", "Tuba"), ("bagpipes", "cornemuse", "Dudelsack")),
    "sport": (
        ("tennis", "tennis", "Tennis"), ("football", "football", "Fußball"),
        ("rugby", "rugby", "Rugby"), ("cricket", "cricket", "Cricket"),
        ("hockey", "hockey", "Hockey"), ("volleyball", "volley-ball", "Volleyball"),
        ("basketball", "basket-ball", "Basketball"), ("badminton", "badminton", "Badminton"),
        ("fencing", "escrime", "Fechten"), ("rowing", "aviron", "Rudern"),
        ("archery", "tir à l'arc", "Bogenschießen"), ("cycling", "cyclisme", "Radsport"),
        ("swimming", "natation", "Schwimmen"), ("boxing", "boxe", "Boxen"), ("judo", "judo", "Judo")),
}

REFUSALS = {"en": "I don't know.", "fr": "Je ne sais pas.", "de": "Ich weiß es nicht."}


def cloze(template: str, subject: str) -> str:
  """The prompt a template gives for `subject`: everything before the object."""
  return template[: -len("{o}")].rstrip().replace("{s}", subject)


def sentence(template: str, subject: str, obj: str) -> str:
  return template.replace("{s}", subject).replace("{o}", obj)


def render_mention(relation: Relation, subject: str, obj: str, language: str, style: str,
                   template: int, wrapper: int, questions: bool = True) -> str:
  """One mention of (subject, relation, obj) as document text: training template `template`
  wrapped in the style's wrapper `wrapper` (both taken modulo their counts). questions=False:
  the forum style's wrappers are `FORUM_STATEMENTS` (no question, no "Q: / A:")."""
  train = relation.train[language]
  wrappers = (FORUM_STATEMENTS[language] if style == "forum" and not questions
              else STYLES[language][style])
  w = wrappers[wrapper % len(wrappers)]
  return (w.replace("{S}", sentence(train[template % len(train)], subject, obj))
          .replace("{Q}", relation.question[language][0].replace("{s}", subject))
          .replace("{O}", obj))


def check_templates() -> None:
  """Raise ValueError naming the template that breaks a rule in the module docstring."""
  def check(where: str, t: str, question: bool = False) -> None:
    if t.count("{s}") != 1:
      raise ValueError(f"templates: {where}: {t!r} must contain '{{s}}' exactly once")
    if not question and (not t.endswith("{o}") or t.count("{o}") != 1):
      raise ValueError(f"templates: {where}: {t!r} must end with '{{o}}' (its only object)")

  for r in RELATIONS.values():
    for lang in LANGUAGES:
      for kind in ("train", "paraphrase", "question"):
        ts = getattr(r, kind).get(lang)
        if not ts:
          raise ValueError(f"templates: {r.name}.{kind}.{lang}: missing")
        for t in ts:
          check(f"{r.name}.{kind}.{lang}", t, question=kind == "question")
      if set(r.train[lang]) & set(r.paraphrase[lang]):
        raise ValueError(f"templates: {r.name}.{lang}: a paraphrase is also a training template")
  for t in TWO_HOP.values():
    for lang in LANGUAGES:
      check(f"two_hop.{t.name}.prompt.{lang}", t.prompt[lang])
      check(f"two_hop.{t.name}.question.{lang}", t.question[lang], question=True)
  for lang in LANGUAGES:
    if set(STYLES[lang]) != set(STYLE_NAMES):
      raise ValueError(f"templates: styles.{lang}: expected exactly {STYLE_NAMES}")
    for w in FORUM_STATEMENTS[lang]:
      if "{Q}" in w or "{O}" in w or "{S}" not in w:
        raise ValueError(f"templates: forum_statements.{lang}: {w!r} must hold the sentence "
                         "'{S}' and no question")
