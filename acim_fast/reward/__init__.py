"""Rewards: final-answer extraction and the verifier pool that checks answers in killable workers."""
