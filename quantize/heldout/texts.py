"""Held-out text written by hand for the fidelity suite: plain prose and multi-turn chat.

Nothing here comes from the calibration generator (`calibration_data`): different topics, sentence lengths and
registers (narrative, explanation, instructions, dialogue), so a quantizer tuned to the calibration prompts gets no
help from them. Written for this project (no third-party text), free to redistribute with it.
"""

PROSE = (
    "The ferry left the harbour a little after six, when the fog was still lying flat on the water. Most of the "
    "passengers stayed inside, holding paper cups of coffee and watching the grey shapes of the islands slide past "
    "the windows. An old man in a green coat went out on deck anyway. He had made the crossing every week for forty "
    "years, first to sell fish and later to visit his sister, and he said the fog was the only part of the trip "
    "that never changed. By the time the engines slowed for the first landing, the sun had burned a hole in the "
    "cloud and the water had turned from pewter to a hard, bright blue.",

    "Bread rises because yeast feeds on the sugars in flour and releases carbon dioxide. The gas is trapped by a "
    "network of gluten, the stretchy protein that forms when wheat flour is mixed with water and kneaded. A dough "
    "that is kneaded too little cannot hold the gas and bakes into a dense loaf; one that is left to rise for too "
    "long collapses because the gluten has been stretched past its limit. Temperature matters as much as time: "
    "yeast is sluggish below about twenty degrees and dies above fifty, which is why many bakers let their dough "
    "rise slowly overnight in a cool kitchen and bake it hot the next morning.",

    "When the city council voted to close the main street to cars on Saturdays, the shop owners were furious. They "
    "predicted empty tills and boarded windows within a year. Instead, the first summer brought street musicians, "
    "children on scooters and a market that spilled over into the side roads. Takings at the bakery rose by a "
    "third. The hardware store, which depended on customers loading heavy bags into their boots, did lose trade, "
    "and it took two more meetings before the council agreed to a loading zone at the corner. Five years later, "
    "nobody remembers that the closure was ever controversial.",

    "A good password is long rather than clever. Four or five ordinary words strung together are harder to guess "
    "than a short word with a few symbols swapped in, and they are far easier to remember. The real danger is not "
    "a weak password but a reused one: when one website is breached, attackers try the same email address and "
    "password everywhere else. A password manager solves this by generating a different random password for every "
    "site and filling it in for you, so that you only need to remember the one that unlocks the manager itself. "
    "Turning on a second factor, such as a code from an app on your phone, closes most of the remaining gaps.",

    "Glaciers move. Under their own weight, the lower layers of ice deform like very stiff putty, and where the "
    "base is wet the whole mass can slide over the rock beneath it. The speed varies enormously, from a few "
    "centimetres a day in the interior of a cold ice sheet to tens of metres a day at the front of a fast outlet "
    "glacier. As the ice flows it drags stones and grit along its bed, scraping grooves into the bedrock and "
    "grinding rock into a fine powder that turns meltwater rivers milky. Long after the ice has gone, those "
    "scratches still point in the direction it travelled.",

    "My grandmother kept her recipes in a biscuit tin, written on the backs of envelopes, bus tickets and the "
    "margins of old calendars. None of them listed quantities in a way anyone else could follow: a cup meant her "
    "chipped blue cup, a handful meant her hand, and the oven was hot enough when you could hold your arm inside "
    "it for a count of seven. After she died we spent a whole winter trying to reproduce her plum cake. We never "
    "quite managed it, but the kitchen was full every Sunday, which I suspect is what she had intended all along.",
)

# Each conversation: (user, assistant) pairs already answered, then the last user message the model answers.
CHAT = (
    ((("Hi! I'm planning a three-day trip to Lisbon in March. Is that a good time to go?",
       "March is a pleasant time to visit Lisbon. Days are mild, usually around fifteen to nineteen degrees, and "
       "there are far fewer tourists than in summer. Pack a light rain jacket, because showers are common."),
      ("Great. What should I not miss on the first day?",
       "Start in Alfama, the old quarter, and walk up to the castle for the view over the river. In the afternoon, "
       "take tram 28 through the narrow streets and end the day with dinner in Bairro Alto.")),
     "And is it worth taking a day trip to Sintra, or is that too much for a short stay?"),
    ((("My tomato plants have yellow leaves at the bottom. What is going on?",
       "Yellowing lower leaves are often a sign of uneven watering or a lack of nitrogen. It can also be early "
       "blight, which starts as brown spots with yellow rings. Are there spots on the leaves?"),),
     "No spots, the leaves just turn pale and then drop off. I water them every evening."),
    ((("Can you help me write a polite email to my landlord? The heating has been broken for a week.",
       "Of course. Here is a draft: Dear Mr Evans, I am writing to let you know that the heating in my flat has "
       "not worked since last Monday. Could you please arrange for someone to repair it as soon as possible? "
       "I am at home most evenings if access is needed. Kind regards."),
      ("That's good, but can you make it a bit firmer? I already called him twice.",
       "Sure. Dear Mr Evans, I have called you twice about the broken heating, which has now been out of order "
       "for a week. I would be grateful if you could confirm by Friday when the repair will take place.")),
     "Perfect. Should I mention that I might withhold rent if nothing happens?"),
    ((("I keep getting the error 'list index out of range' in my Python loop. What does it mean?",
       "It means the code tried to read a position in a list that does not exist. For example, a list with three "
       "items has positions 0, 1 and 2; asking for position 3 raises that error. Can you show me the loop?"),),
     "for i in range(len(scores) + 1): print(scores[i]). I want to print every score."),
)
