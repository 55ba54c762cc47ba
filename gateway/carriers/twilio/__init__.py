"""Twilio: Media Streams (codec and leg), TwiML, signatures, REST call control and transfers.
A second carrier is a sibling package with the same parts."""
