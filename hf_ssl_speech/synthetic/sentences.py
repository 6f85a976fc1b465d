"""Deterministic English sentences for the demo corpus, made from shipped word lists and a small grammar.

Why a grammar and not a text file: it needs no download and no licence check, draws from a vocabulary of
several thousand word forms (nouns with plurals, verbs with all their inflections), and never runs out, so a
3-hour corpus repeats almost no sentence. Every sentence is already normalised to the transcript alphabet
(`a-z`, apostrophe, space). The words are common English so a recogniser trained on them learns ordinary
spelling-to-sound, and the sentences are grammatical even when they are odd ("the quiet barber painted a
purple ladder near the station").

Randomness comes only from the `numpy.random.Generator` passed in, so a sentence is a pure function of that
generator's state.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Word lists. Nouns are countable; `_IRREGULAR_PLURALS` overrides the spelling rule.
# ---------------------------------------------------------------------------------------------------------------

_NOUNS = """
apple apron arrow axe baby backpack badge bag bakery ball balloon banana band bank barn barrel basket bat bath
battery beach bead beam bean bear bed bee beetle bell belt bench berry bicycle bill bird biscuit blanket block
boat bone book boot bottle bowl box boy bracelet branch bread brick bridge broom brother brush bubble bucket
bug building bulb bus bush butterfly button cabin cabinet cable cake calendar camel camera camp can candle
cannon canoe cap captain car card carpet carrot cart castle cat cave ceiling chain chair chalk channel cheese
cherry chest chicken child chimney chip church circle city clock cloud coat coin collar comb computer cook
cookie corner cottage couch cousin cow crab crayon cricket crown cup cupboard curtain cushion daisy deer desk
diamond dinosaur dish doctor dog doll dolphin donkey door dragon drawer dress drum duck eagle ear egg elephant
elevator envelope eye face factory fan farm farmer feather fence field finger fire fish flag flower flute
fork fountain fox frog garage garden gate ghost giant giraffe girl glass glove goat gold goose grape
guitar hammer hand handle hat hedge helmet hill hole horse hospital hotel house island jacket jar jelly jewel
judge kettle key king kitchen kite kitten knife knot ladder lake lamb lamp lantern lawyer leaf lemon letter
library lighthouse lion lizard lock log machine magnet map market mask meadow medal mirror monkey moon
mountain mouse mug museum nail necklace needle nest net newspaper nurse nut oak ocean office onion orange owl
painter palace pan panda parcel parrot path peach pear pebble pen pencil penguin pepper piano picture pig
pillow pilot pin pipe pirate plate pocket pond pony pot potato prince princess pumpkin puppy puzzle queen
rabbit radio raft rail rainbow ribbon ring river road robot rock rocket roof room rope rose sailor sandwich
saucer scarf school scissors sea seal seed shadow shark sheep shelf shell ship shirt shoe shop shovel sink
sister skirt sled snail snake sock soldier spider spoon square squirrel stair star station statue stick
stone stool storm stove street student submarine suitcase sun swan sweater table tail teacher telephone tent
thread throne tiger tire toad toaster tomato tooth torch towel tower toy tractor train tray tree truck
trumpet tunnel turkey turtle umbrella valley van vase village violin wagon wall wallet wand watch wave wheel
whale whistle window wing wolf worm yard zebra
actor answer arm army artist baker barber beard blade board body boss bottom brain breakfast bridge bucket
butcher cage camel canal candy captain carriage cellar chapter cheek chef chin citizen clerk cliff climber
coach coast collar cook costume cottage country court crew crowd curtain customer daughter dancer dentist
detective diver driver drummer editor engine engineer explorer fairy feast ferry fisherman forest friend
gardener garment guard guest guide harbor hunter husband inventor jester journey judge jungle keeper knight
lady landlord leader lesson lid lord mayor merchant message miner minister model monster mother neighbor
nephew niece novel officer owner painter parent partner passenger patient pirate planet player poet porter
postman potter prisoner professor prophet puppet rider robber ruler runner sailor scholar scientist season
servant sheriff singer soldier son speaker spy stranger supper surgeon tailor tenant thief tourist trader
traveler twin uncle victim visitor voter waiter warrior weaver widow wife winner wizard worker writer
answer argument bargain battle birthday blessing career chance choice contest conversation decision dream
error event excuse experiment fact feeling festival gift habit holiday idea journey joke lesson meeting
memory mistake moment month morning mystery plan plot poem problem promise puzzle question reason record
reply report rhyme riddle rule secret sentence signal song sound speech story subject surprise task theory
thought trick trip victory voice week wish word year hour minute evening afternoon night day weekend century
accident address adventure agreement airport alarm album alley anchor angle ankle apartment appetite arch
arena attic auction avenue award balcony bandage banner barrel basin beacon blossom bonnet bookcase boulder
bouquet bow bracket brook bubble buckle buffalo bundle bunny burrow cactus canyon cape carnival carton
cathedral cattle cedar chamber chapel chariot chimney chorus cinema circus clay closet clover cobweb cocoon
compass concert cone coral cork cradle crane crater creek crystal cub cucumber cylinder dagger dam desert
diary dock dome doorway dove dune easel elbow emerald engine fabric feather fern fiddle fig flame flask fleet
flock fog folder footprint fossil frame freezer fridge galaxy gallery garlic gem glacier globe goblin gorilla
grove gull hall hallway hammock hamster harp hawk heel helicopter hen herb hive hoop hut igloo iron ivy jaguar
jeep jug kangaroo kayak kennel kettle kingdom koala label lace lagoon lawn leopard lettuce lever lily lime
locket locomotive lobster magazine mailbox mansion marble meadow melon microscope mill mitten moose mosquito
moth motor mule mushroom napkin nostril oar octopus orchard ostrich otter oven oyster paddle pail palm pancake
parade parachute pasture patch pavement peacock peanut pearl pedal pelican pepper pharmacy pickle pier pigeon
pillar pine pitcher planet platform plum porch poster pouch prairie pudding pyramid quilt raccoon radish
raincoat raven reef reindeer rhino robin rooster ruby rug saddle salad salmon sandal satellite sausage scale
scarecrow scooter scroll sculpture seashell shed shepherd shield shutter skeleton skyscraper slipper
snowflake snowman sofa spade sparrow spear sponge stable stadium stamp stapler steeple stork strawberry
stream studio sunflower swamp sword syrup tablet tadpole tambourine tavern temple terrace thimble thistle
thorn ticket tiger tile timber toe tortoise trail trolley trophy trunk tulip turnip twig typewriter unicorn
vest vine volcano vulture waffle waterfall wheat wheelbarrow windmill wolf woodpecker wreath wrench wrist
"""

_IRREGULAR_PLURALS = dict(
    pair.split(":")
    for pair in """
child:children man:men woman:women foot:feet tooth:teeth mouse:mice goose:geese sheep:sheep fish:fish deer:deer
moose:moose cattle:cattle knife:knives leaf:leaves wife:wives shelf:shelves wolf:wolves calf:calves half:halves
loaf:loaves scarf:scarves thief:thieves potato:potatoes tomato:tomatoes hero:heroes volcano:volcanoes
person:people cactus:cacti scissors:scissors series:series ox:oxen buffalo:buffaloes mosquito:mosquitoes
""".split()
)

_ADJECTIVES = """
able active afraid ancient angry anxious awake awful bad bald beautiful best better big bitter black blank
blind blue bold bored brave bright brilliant broad broken brown busy calm careful careless cheap cheerful
chilly clean clear clever cloudy clumsy cold colorful common cool cozy crazy crooked cruel curious curly cute
damp dangerous dark dear deep delicate dirty dizzy dry dull dusty eager early easy elegant empty enormous
evil excellent expensive faint fair famous fancy far fast fat fierce filthy fine firm flat fluffy foolish
fragile free fresh friendly frozen full funny gentle giant glad gloomy golden good gorgeous graceful grand
gray great greedy green grumpy guilty hairy handsome happy hard harsh healthy heavy helpful hidden high hollow
honest hot huge humble hungry icy ideal important innocent jolly juicy kind large late lazy light little
lively lonely long loose loud lovely low loyal lucky mad magic massive mean merry messy mighty mild modern
moist muddy narrow nasty naughty near neat nervous new nice noisy odd old orange ordinary pale patient
peaceful perfect pink plain pleasant plump polite poor popular powerful precious pretty proud purple quick
quiet rare raw ready red rich right ripe rotten rough round royal rude rusty sad safe salty scary secret
serious shallow sharp shiny short shy silent silly silver simple sleepy slim slippery slow small smart smooth
soft solid sore sour spicy splendid spotted square steady steep sticky stiff still strange strict strong
stupid sudden sunny super sweet swift tall tame tasty tender terrible thick thin thirsty tidy tiny tired
tough tricky ugly useful vast violet warm weak wealthy weary wet white whole wicked wide wild wise wonderful
wooden worried wrong yellow young
absent accurate adorable advanced agile alert alive amazing amused ashamed average bashful basic bleak
blissful blunt bouncy breezy brief bumpy candid chubby classic clumsy coarse crisp crowded cunning dainty
dazzling decent dense dim distant dreamy drowsy dusky elderly energetic enchanted endless exotic faithful
feeble festive fiery flimsy formal fortunate frantic frosty fuzzy generous giddy glossy grateful gritty hasty
hearty hefty hilarious hopeful humid idle immense jagged jealous jumpy keen knobby lanky lavish lean lumpy
majestic marvelous meek mellow misty modest mysterious naive nimble nosy obedient ornate painful peculiar
perky pleasant polished prickly puny quaint radiant rapid restless rigid rocky rosy rugged rustic sacred
savage scarce scruffy selfish shabby shaggy sincere skinny sleek slender sloppy sly smoky snug soggy sparkling
speedy spiky spotless stale stormy sturdy sulky superb swollen tangled tense thorough thoughtful thrifty timid
tranquil tremendous trusty twisted upset urgent vacant vague valiant vivid wary wavy whimsical wiry witty
wobbly woolly zealous
"""

# Verbs: "base" follows the spelling rules; "base+" doubles the final consonant (stop, stopped, stopping);
# "base:past:participle" gives irregular forms.
_TRANSITIVE_VERBS = """
accept admire adopt answer arrange attack avoid bake borrow boil brush burn bury calculate call carry carve
change chase check clean clear climb close collect comb compare consider cook copy count cover crack create
cross crush decorate defend deliver describe design destroy discover dry dust earn enjoy examine explain
explore fill finish fix fold follow guard guide handle help hunt imagine improve inspect invent invite join
kick kiss knock lift like load lock love mark measure mend miss mix move need notice offer open order own
paint pack park pass peel pick place plant play polish pour prepare print protect pull push question raise
reach receive record remember remove repair replace rescue return roll save search serve share sign smell
solve sort squeeze start study support surround taste test thank touch tow trace trade train trust turn
unlock use visit wash watch water weigh welcome wipe want warn fetch steer tie hug+ grab+ drop+ stop+ plan+
rob+ chop+ trim+ pat+ tap+ scrub+ stir+ spot+ ship+ snap+ tug+ wrap+ admit+ observe paste punish rinse scatter
shelter sketch spray stack stamp stuff toss weave:wove:woven wrestle
bring:brought:brought buy:bought:bought build:built:built catch:caught:caught choose:chose:chosen
draw:drew:drawn drink:drank:drunk drive:drove:driven eat:ate:eaten feed:fed:fed find:found:found
forget:forgot:forgotten forgive:forgave:forgiven give:gave:given hear:heard:heard hide:hid:hidden
hit:hit:hit hold:held:held keep:kept:kept know:knew:known lead:led:led leave:left:left lend:lent:lent
lose:lost:lost make:made:made meet:met:met pay:paid:paid put:put:put read:read:read ride:rode:ridden
ring:rang:rung see:saw:seen sell:sold:sold send:sent:sent shake:shook:shaken shoot:shot:shot
show:showed:shown sing:sang:sung spend:spent:spent steal:stole:stolen sweep:swept:swept take:took:taken
teach:taught:taught tear:tore:torn tell:told:told throw:threw:thrown understand:understood:understood
wake:woke:woken wear:wore:worn win:won:won write:wrote:written bite:bit:bitten blow:blew:blown
break:broke:broken cut:cut:cut dig:dug:dug hang:hung:hung light:lit:lit set:set:set shut:shut:shut
spread:spread:spread strike:struck:struck bend:bent:bent seek:sought:sought feel:felt:felt
beat:beat:beaten forbid:forbade:forbidden freeze:froze:frozen grind:ground:ground
"""

_INTRANSITIVE_VERBS = """
arrive bark blink breathe cough crawl cry dance disappear dream float giggle glow happen hurry jump laugh
listen live march pause pray rest rush shiver shout sigh smile sneeze snore stay talk tremble wait walk wander
whisper whistle work yawn yell vanish sail skate sparkle stumble wobble bounce drift flow howl land limp
mumble relax roar scream settle stroll struggle sway vote wink argue agree complain hesitate kneel:knelt:knelt
nod+ hum+ jog+ shrug+ slip+ travel:traveled:traveled
fall:fell:fallen fly:flew:flown grow:grew:grown rise:rose:risen run+:ran:run shine:shone:shone sit:sat:sat
sleep:slept:slept slide:slid:slid speak:spoke:spoken stand:stood:stood swim:swam:swum come:came:come
go:went:gone sink:sank:sunk shrink:shrank:shrunk swing:swung:swung fight:fought:fought
"""

_ADVERBS = """
quickly slowly quietly loudly carefully happily sadly gently suddenly finally easily badly bravely calmly
eagerly softly proudly politely rarely boldly clearly closely cheerfully angrily anxiously awkwardly blindly
briskly cautiously correctly deeply early eventually fiercely foolishly freely gladly gracefully greedily
honestly hungrily innocently kindly lazily lightly loosely madly merrily nervously neatly noisily openly
patiently perfectly quickly rapidly roughly rudely safely seldom sharply shyly silently smoothly sleepily
steadily sternly swiftly tenderly thoughtfully tightly truly warmly wearily wildly wisely yearly together
outside upstairs downstairs again already away
"""

_DEGREE_ADVERBS = "very quite rather really too so extremely fairly terribly incredibly slightly almost"

_NAMES = """
adam alice amelia andrew anna arthur ben bella charlie chloe daniel david edward eleanor ella emily emma ethan
felix fiona frank george grace hannah harry helen henry isaac jack jacob james jane jasmine john julia kate
laura leo lily lucy luke margaret maria mark martha mary matthew max mia michael molly nathan nora oliver
olivia oscar paul peter rachel robert rose ruby ryan sam sarah simon sophie thomas tom victoria william zoe
albert alex amy anthony beth bob carl carol clara dennis diana dora edith elsie eric eva frances fred gloria
gordon harold hazel howard irene ivan jill joan joe karen kevin linda louis mabel martin nancy neil ned
norman pamela patrick philip quentin ralph rita roger ruth sally steven susan ted tina ursula vera walter
wendy
"""

_PLACES = """
london paris berlin rome madrid lisbon dublin vienna prague athens cairo tokyo delhi sydney toronto chicago
boston denver dallas seattle houston atlanta miami phoenix portland memphis detroit glasgow edinburgh cardiff
belfast oxford cambridge york bristol leeds liverpool manchester brighton canada mexico brazil peru chile
egypt kenya india china japan spain france italy greece norway sweden finland poland germany ireland
scotland wales england iceland texas ohio oregon nevada vermont alaska florida georgia kansas maine montana
"""

_PLACE_PREPOSITIONS = (
    "in on under near behind beside across through along around inside outside above below beyond toward past over by"
).split()

_TIMES = [
    phrase.strip()
    for phrase in """
yesterday | today | tomorrow | last night | this morning | this evening | every morning | every winter | at noon
| at midnight | after dinner | before breakfast | last week | next week | last summer | next spring | on monday
| on tuesday | on wednesday | on thursday | on friday | on saturday | on sunday | in january | in february | in
march | in april | in may | in june | in july | in august | in september | in october | in november | in
december | at dawn | at sunset | twice a day | once a year | all day long | later that night | early in the
morning | late in the afternoon | during the storm | after the party | before the game | in the spring
""".split("|")
]

_OPENERS = [
    phrase.strip()
    for phrase in """
suddenly | later | finally | meanwhile | luckily | sadly | of course | at first | in the end | without a word |
to our surprise | as usual | once again | just then | after a while | by morning | somehow | perhaps | strangely
| naturally | unfortunately | fortunately | that night
""".split("|")
]

_PRONOUN_SUBJECTS = {  # subject -> (be present, be past, has/have)
    "i": ("am", "was", "have"),
    "you": ("are", "were", "have"),
    "he": ("is", "was", "has"),
    "she": ("is", "was", "has"),
    "we": ("are", "were", "have"),
    "they": ("are", "were", "have"),
}

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
_ONES += "seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()

_ALLOWED = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r" +")
_DIGITS = re.compile(r"[0-9]+")

# Words the templates write literally (everything else comes from the lists above).
_TEMPLATE_WORDS = """
a an the some those these my your his her our their many few every this that and there were was is are am
have has had will should might must can would could not did do because it too if how why said thought heard
believed told us promised wrote wants wanted hopes tried refused forgot to never already just often always yet
please now quickly seems looked felt became stayed of day night on weekends
"""


def normalize_text(text: str) -> str:
    """Map free text to the transcript alphabet: lower-case `a-z`, apostrophe and single spaces.

    Accents are stripped (café -> cafe), numbers up to 999 are spelled out (larger ones dropped), punctuation
    becomes a word break, curly apostrophes become straight ones, and apostrophes not inside a word are dropped.
    """
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = _DIGITS.sub(lambda m: f" {number_words(int(m.group()))} " if len(m.group()) <= 3 else " ", text)
    text = _ALLOWED.sub(" ", text)
    words = [w.strip("'") for w in text.split(" ")]
    return _SPACES.sub(" ", " ".join(w for w in words if w)).strip()


def number_words(n: int) -> str:
    """Spell 0 <= n < 1000 as English words ("three hundred and twelve")."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words: n={n} is outside 0..999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens - 2] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


# ---------------------------------------------------------------------------------------------------------------
# Inflection
# ---------------------------------------------------------------------------------------------------------------

_VOWELS = "aeiou"


def plural(noun: str) -> str:
    """English plural of a countable noun (irregular table first, then the spelling rules)."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def _third_person(base: str) -> str:
    if base in ("go", "do"):
        return base + "es"
    if base.endswith(("s", "x", "z", "ch", "sh")):
        return base + "es"
    if base.endswith("y") and base[-2] not in _VOWELS:
        return base[:-1] + "ies"
    return base + "s"


def _ing(base: str, double: bool) -> str:
    if double:
        return base + base[-1] + "ing"
    if base.endswith("ie"):
        return base[:-2] + "ying"
    if base.endswith("e") and not base.endswith(("ee", "oe", "ye")):
        return base[:-1] + "ing"
    return base + "ing"


def _regular_past(base: str, double: bool) -> str:
    if double:
        return base + base[-1] + "ed"
    if base.endswith("e"):
        return base + "d"
    if base.endswith("y") and base[-2] not in _VOWELS:
        return base[:-1] + "ied"
    return base + "ed"


def _parse_verbs(spec: str) -> list[dict[str, str]]:
    """Parse the verb list notation into dicts with keys base, s, past, pp, ing."""
    verbs = []
    for entry in spec.split():
        parts = entry.split(":")
        head = parts[0]
        double = head.endswith("+")
        base = head.rstrip("+")
        past = parts[1] if len(parts) > 1 else _regular_past(base, double)
        pp = parts[2] if len(parts) > 2 else past
        verbs.append({"base": base, "s": _third_person(base), "past": past, "pp": pp, "ing": _ing(base, double)})
    return verbs


def _unique(spec: str) -> list[str]:
    return list(dict.fromkeys(spec.split()))


# ---------------------------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------------------------


class SentenceGenerator:
    """Random grammatical English sentences over the shipped vocabulary.

    `sentence(rng)` draws one sentence; the result depends only on `rng`'s state, so a per-utterance
    `numpy.random.Generator` seeded from (corpus seed, split, index) gives the same text whatever the worker
    count.
    """

    def __init__(self) -> None:
        self.nouns = _unique(_NOUNS)
        self.adjectives = _unique(_ADJECTIVES)
        self.transitive = _parse_verbs(_TRANSITIVE_VERBS)
        self.intransitive = _parse_verbs(_INTRANSITIVE_VERBS)
        self.adverbs = _unique(_ADVERBS)
        self.degree = _DEGREE_ADVERBS.split()
        self.names = _unique(_NAMES)
        self.places = _unique(_PLACES)
        self._templates = [
            self._svo_past,
            self._name_svo,
            self._pair_intransitive,
            self._future,
            self._question_did,
            self._there_were,
            self._progressive,
            self._plural_present,
            self._habit,
            self._why,
            self._could_not,
            self._is_adjective,
            self._said_that,
            self._conditional,
            self._perfect,
            self._how_many,
            self._opener,
            self._wants_to,
            self._of_phrase,
            self._imperative,
        ]

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _pick(rng: np.random.Generator, items: list) -> object:
        return items[int(rng.integers(len(items)))]

    def _noun_phrase(self, rng: np.random.Generator, plural_ok: bool = True) -> str:
        """A determiner, an optional adjective and a noun ("the old lantern", "two green frogs")."""
        noun = self._pick(rng, self.nouns)
        adjective = self._pick(rng, self.adjectives) if rng.random() < 0.55 else None
        roll = rng.random()
        if plural_ok and roll < 0.25:
            det = self._pick(rng, ["the", "some", "those", "these", "my", "our", "their", "many", "a few"])
            if rng.random() < 0.3:
                det = number_words(int(rng.integers(2, 13)))
            return " ".join(w for w in (det, adjective, plural(noun)) if w)
        words = " ".join(w for w in (adjective, noun) if w)
        det = self._pick(rng, ["the", "the", "a", "a", "this", "that", "my", "your", "his", "her", "our", "every"])
        if det == "a" and words[0] in _VOWELS:
            det = "an"
        return f"{det} {words}"

    def _subject(self, rng: np.random.Generator) -> tuple[str, bool]:
        """A subject and whether it is third person singular (for present-tense agreement)."""
        roll = rng.random()
        if roll < 0.3:
            return self._pick(rng, self.names), True
        if roll < 0.5:
            pronoun = self._pick(rng, list(_PRONOUN_SUBJECTS))
            return pronoun, pronoun in ("he", "she")
        noun = self._pick(rng, self.nouns)
        adjective = self._pick(rng, self.adjectives) if rng.random() < 0.5 else None
        if rng.random() < 0.3:
            return " ".join(w for w in ("the", adjective, plural(noun)) if w), False
        return " ".join(w for w in ("the", adjective, noun) if w), True

    def _place(self, rng: np.random.Generator) -> str:
        if rng.random() < 0.25:
            return "in " + self._pick(rng, self.places)
        return self._pick(rng, _PLACE_PREPOSITIONS) + " " + self._noun_phrase(rng, plural_ok=False)

    def _maybe(self, rng: np.random.Generator, p: float, text_fn) -> str:
        return text_fn(rng) if rng.random() < p else ""

    def _time(self, rng: np.random.Generator) -> str:
        return self._pick(rng, _TIMES)

    @staticmethod
    def _join(*parts: str) -> str:
        return " ".join(p for p in parts if p)

    # -- templates -------------------------------------------------------------------------------------------
    def _svo_past(self, rng):
        verb = self._pick(rng, self.transitive)
        return self._join(
            self._noun_phrase(rng), verb["past"], self._noun_phrase(rng), self._maybe(rng, 0.5, self._place)
        )

    def _name_svo(self, rng):
        verb = self._pick(rng, self.transitive)
        adverb = self._pick(rng, self.adverbs) if rng.random() < 0.5 else ""
        return self._join(self._pick(rng, self.names), verb["past"], self._noun_phrase(rng), adverb)

    def _pair_intransitive(self, rng):
        verb = self._pick(rng, self.intransitive)
        names = f"{self._pick(rng, self.names)} and {self._pick(rng, self.names)}"
        return self._join(names, verb["past"], self._maybe(rng, 0.6, self._place), self._maybe(rng, 0.5, self._time))

    def _future(self, rng):
        subject, _ = self._subject(rng)
        verb = self._pick(rng, self.transitive)
        modal = self._pick(rng, ["will", "should", "might", "must", "can", "would"])
        return self._join(subject, modal, verb["base"], self._noun_phrase(rng), self._time(rng))

    def _question_did(self, rng):
        verb = self._pick(rng, self.transitive)
        subject, _ = self._subject(rng)
        return self._join("did", subject, verb["base"], self._noun_phrase(rng), self._maybe(rng, 0.4, self._place))

    def _there_were(self, rng):
        count = int(rng.integers(2, 1000)) if rng.random() < 0.3 else int(rng.integers(2, 20))
        adjective = self._pick(rng, self.adjectives) if rng.random() < 0.5 else ""
        noun = plural(self._pick(rng, self.nouns))
        return self._join("there were", number_words(count), adjective, noun, self._place(rng))

    def _progressive(self, rng):
        pronoun = self._pick(rng, list(_PRONOUN_SUBJECTS))
        be = _PRONOUN_SUBJECTS[pronoun][0 if rng.random() < 0.5 else 1]
        verb = self._pick(rng, self.transitive)
        return self._join(pronoun, be, verb["ing"], self._noun_phrase(rng), self._maybe(rng, 0.5, self._place))

    def _plural_present(self, rng):
        verb = self._pick(rng, self.intransitive)
        noun = plural(self._pick(rng, self.nouns))
        adverb = self._pick(rng, self.adverbs)
        return self._join("the", noun, verb["base"], adverb, self._maybe(rng, 0.4, self._place))

    def _habit(self, rng):
        verb = self._pick(rng, self.intransitive)
        subject, singular = self._subject(rng)
        form = verb["s"] if singular else verb["base"]
        return self._join(subject, form, self._place(rng), self._pick(rng, ["every day", "every night", "on weekends"]))

    def _why(self, rng):
        verb = self._pick(rng, self.transitive)
        return self._join("why did", self._pick(rng, self.names), verb["base"], self._noun_phrase(rng))

    def _could_not(self, rng):
        pronoun = self._pick(rng, list(_PRONOUN_SUBJECTS))
        verb = self._pick(rng, self.transitive)
        adjective = self._pick(rng, self.adjectives)
        return self._join(
            pronoun, "could not", verb["base"], self._noun_phrase(rng, plural_ok=False), "because it was too", adjective
        )

    def _is_adjective(self, rng):
        noun = self._pick(rng, self.nouns)
        return self._join(
            "the",
            noun,
            self._pick(rng, ["is", "was", "seems", "looked", "felt"]),
            self._pick(rng, self.degree),
            self._pick(rng, self.adjectives),
        )

    def _said_that(self, rng):
        verb = self._pick(rng, self.intransitive)
        speech = self._pick(rng, ["said", "thought", "heard", "believed", "told us", "promised", "wrote"])
        return self._join(
            self._pick(rng, self.names),
            speech,
            "that",
            self._noun_phrase(rng, plural_ok=False),
            verb["past"],
            self._maybe(rng, 0.6, self._place),
        )

    def _conditional(self, rng):
        noun = self._noun_phrase(rng, plural_ok=False)
        verb_i = self._pick(rng, self.intransitive)
        verb_t = self._pick(rng, self.transitive)
        pronoun = self._pick(rng, list(_PRONOUN_SUBJECTS))
        return self._join("if", noun, verb_i["s"], pronoun, "will", verb_t["base"], self._noun_phrase(rng))

    def _perfect(self, rng):
        pronoun = self._pick(rng, list(_PRONOUN_SUBJECTS))
        have = _PRONOUN_SUBJECTS[pronoun][2]
        verb = self._pick(rng, self.transitive)
        adverb = self._pick(rng, ["never", "already", "just", "often", "always", "not yet"])
        if adverb == "not yet":
            return self._join(pronoun, have, "not", verb["pp"], self._noun_phrase(rng), "yet")
        return self._join(pronoun, have, adverb, verb["pp"], self._noun_phrase(rng))

    def _how_many(self, rng):
        verb = self._pick(rng, self.transitive)
        noun = plural(self._pick(rng, self.nouns))
        return self._join("how many", noun, "did", self._pick(rng, self.names), verb["base"], self._time(rng))

    def _opener(self, rng):
        verb = self._pick(rng, self.intransitive)
        return self._join(
            self._pick(rng, _OPENERS), self._noun_phrase(rng), verb["past"], self._maybe(rng, 0.5, self._place)
        )

    def _wants_to(self, rng):
        verb = self._pick(rng, self.transitive)
        want = self._pick(rng, ["wants to", "wanted to", "hopes to", "tried to", "refused to", "forgot to"])
        return self._join(self._pick(rng, self.names), want, verb["base"], self._noun_phrase(rng), self._place(rng))

    def _of_phrase(self, rng):
        return self._join(
            "the",
            self._pick(rng, self.nouns),
            "of",
            self._noun_phrase(rng, plural_ok=False),
            self._pick(rng, ["was", "is", "became", "stayed"]),
            self._pick(rng, self.adjectives),
        )

    def _imperative(self, rng):
        verb = self._pick(rng, self.transitive)
        lead = self._pick(rng, ["please", "do not", "never", "always", "quickly", "now"])
        return self._join(lead, verb["base"], self._noun_phrase(rng), self._maybe(rng, 0.5, self._time))

    # -- public ----------------------------------------------------------------------------------------------
    def sentence(self, rng: np.random.Generator) -> str:
        """One normalised sentence drawn with `rng` (a `numpy.random.Generator`)."""
        template = self._templates[int(rng.integers(len(self._templates)))]
        return normalize_text(template(rng))

    def vocabulary(self) -> set[str]:
        """Every word form the generator can emit (for tests and corpus statistics)."""
        words: set[str] = set()
        for noun in self.nouns:
            words.update((noun, plural(noun)))
        for verb in self.transitive + self.intransitive:
            words.update(verb.values())
        words.update(self.adjectives, self.adverbs, self.degree, self.names, self.places, _PLACE_PREPOSITIONS)
        for phrase in _TIMES + _OPENERS:
            words.update(phrase.split())
        words.update(_PRONOUN_SUBJECTS)
        for forms in _PRONOUN_SUBJECTS.values():
            words.update(forms)
        words.update(_ONES, _TENS, ["hundred"], _TEMPLATE_WORDS.split())
        return words
