"""semoe.storage"""
