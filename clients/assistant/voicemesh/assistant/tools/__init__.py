"""The assistant's tools, one module per backend; each module's `tools(ctx)` builds its Tools
over a plain class holding the logic (testable without a model):

    calendar   Calendar     calendar_list_events, calendar_add_event, calendar_move_event, calendar_cancel_event*,
                            calendar_free_time
    tasks      Tasks        tasks_add, tasks_list, tasks_complete, tasks_uncomplete, tasks_delete*
    reminders  Reminders    reminder_set, timer_set, reminders_list, reminder_cancel*
    notes      Notes        notes_search, notes_read, notes_add
    home       HomeAssistant  home_list_devices, home_device_status, home_light, home_set_temperature,
                            home_activate_scene
    email      SmtpSettings, send, latest   email_send*, email_read_latest
(* has a confirm question: the user says yes first.) when.py reads dates and times, store.py
opens the SQLite files.
"""
