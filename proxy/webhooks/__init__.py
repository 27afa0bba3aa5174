"""Inbound webhooks (SPEC 11): verify the provider's signature, then hand the event on.

verify.py    one pure function per signature scheme (stripe, github, slack, standard,
             shopify, twilio, hmac)
routes.py    a config's routes by exact path, with their secrets rendered into keys
sink.py      EventSink / VerifiedEvent / Acceptance: the interface to the store
listener.py  the listener: route, method, size limit, verify, hand on, answer
"""
